from safetensors.torch import load_file


def load_torch_file(path, safe_load=True, return_metadata=False):
    sd = load_file(str(path))
    return (sd, {}) if return_metadata else sd


class ProgressBar:
    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        pass
