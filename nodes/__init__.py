"""ComfyUI glue. Each module below exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.

A module that fails to import (a broken optional dependency, say) is logged with its traceback and left out;
the other modules' nodes still register, so one missing piece never makes the whole pack vanish.
"""
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
FAILED_MODULES = {}

for _name in NODE_MODULES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except Exception as _err:  # noqa: BLE001  (any import failure: keep the rest of the pack usable)
        FAILED_MODULES[_name] = f"{type(_err).__name__}: {_err}"
        LOG.exception("shielded sampling: the nodes of nodes/%s.py are not available (%s); the other nodes load",
                      _name, FAILED_MODULES[_name])
        continue
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
