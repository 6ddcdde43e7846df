"""Automatic1111 / Forge glue of the shielded & diverse sampling pack (the ComfyUI glue is ``nodes/``).

The WebUI puts every extension's folder on ``sys.path`` while it loads the extension's ``scripts/``, so this
package, ``guidance`` and ``shield_db`` import as top-level packages there. Nothing here imports ComfyUI, and
only the modules named ``forge_*`` / ``webui_*`` import the WebUI's own modules.
"""
