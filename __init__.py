"""ComfyUI entry point of the shielded & diverse sampling pack (classic node mappings).

Outside ComfyUI (e.g. when pytest imports the folder as a package to run the pure-torch tests) there is
no host to register nodes with, so the mappings stay empty instead of failing on ``import comfy``.
"""
import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
