"""A stand-in for the few ComfyUI modules ``python -m shield_db build`` imports, for the fault harness only.

Its VAE is a fixed 8x8 average pooling plus a 3 -> 4 channel mix read from the "VAE file": deterministic,
instant and dependent on every weight of the file, so the harness can run the real CLI hundreds of times.
"""
