"""ComfyUI glue. Each module below exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS."""
import importlib
import logging

LOG = logging.getLogger("shielded_sampling")

NODE_MODULES = [
    "shield_loader",
    "spell_nodes",
    "report_nodes",
    "calibration_nodes",
    "dng_nodes",
    "particle_nodes",
]

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

for _name in NODE_MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
