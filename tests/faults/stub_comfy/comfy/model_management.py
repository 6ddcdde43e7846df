def throw_exception_if_processing_interrupted():
    return None
