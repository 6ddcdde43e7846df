"""The one place ``shield_db`` imports the pack's ``guidance`` math (the feature map, shield-source helpers).

Inside ComfyUI the pack folder is one package (``<pack>.shield_db``, ``<pack>.guidance``); in the WebUI, the CLI and
the tests both are top-level packages. ``guidance`` never imports ``shield_db``.
"""
try:
    from ..guidance import feature_screen, shields
except ImportError:
    from guidance import feature_screen, shields

__all__ = ["feature_screen", "shields"]
