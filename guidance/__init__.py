"""Pure torch guidance math. Nothing in this package imports ComfyUI."""
