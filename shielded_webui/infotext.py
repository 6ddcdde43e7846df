"""The PNG infotext ("parameters") keys of the extension, written by a generation and read back on paste."""
from __future__ import annotations

from .settings import DEFAULT_HISTORY, INIT_LEAVE, ShieldedSettings

RADIUS = "SPELL radius"
OVERCOMPENSATION = "SPELL overcompensation"
INTRA_BATCH = "SPELL intra-batch"
HISTORY = "SPELL history"
WINDOW = "SPELL window"
EXACT = "SPELL exact"
SHIELDS = "SPELL shields"
COUPLING = "Start coupling"
INIT_IMAGE = "SPELL init image"
RESULT = "SPELL result"        # what happened to this batch (written after sampling; never read back)
# The WebUI's infotext parser splits any "NxM" value into "key-1"/"key-2" (image sizes); grids are written as
# "spread NxM" so they come back whole.
SPREAD = "spread "


def write(settings: ShieldedSettings) -> dict:
    """Infotext entries for ``settings`` (defaults left out, as the WebUI does for its own parameters)."""
    s = settings
    out = {}
    if s.enabled:
        out[RADIUS] = round(float(s.radius_rms), 6)
        if s.overcompensation != 1.0:
            out[OVERCOMPENSATION] = round(float(s.overcompensation), 6)
        out[INTRA_BATCH] = bool(s.intra_batch)
        if s.history:
            out[HISTORY] = s.history_name.strip()
        if s.start_percent > 0.0 or s.end_percent < 1.0:
            out[WINDOW] = f"{s.start_percent:g}-{s.end_percent:g}"
        if s.exact:
            out[EXACT] = True
        if s.shield_folder.strip():
            out[SHIELDS] = s.shield_folder.strip()
        if s.init_image_shield != INIT_LEAVE:
            out[INIT_IMAGE] = s.init_image_shield
    if s.start_coupling != "off":
        out[COUPLING] = SPREAD + s.start_coupling if s.start_coupling[:1].isdigit() else s.start_coupling
    return out


def _bool(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def _window(value) -> tuple[float, float]:
    text = str(value).strip()
    start, _, end = text.partition("-")
    try:
        return float(start), float(end or 1.0)
    except ValueError:
        return 0.0, 1.0


def _coupling(value) -> str:
    text = str(value).strip()
    return text[len(SPREAD):] if text.startswith(SPREAD) else text


def read(params: dict) -> dict:
    """Setting values found in a parsed infotext (``{key: str}``); settings it does not mention are not returned,
    except that a pasted infotext without SPELL keys switches SPELL off (as a pasted image without them was made)."""
    out = {"enabled": RADIUS in params}
    if RADIUS not in params:
        if COUPLING in params:
            out["start_coupling"] = _coupling(params[COUPLING])
        return out
    out["radius_rms"] = float(params[RADIUS])
    out["overcompensation"] = float(params.get(OVERCOMPENSATION, 1.0))
    out["intra_batch"] = _bool(params.get(INTRA_BATCH, False))
    out["history"] = HISTORY in params
    out["history_name"] = str(params.get(HISTORY, DEFAULT_HISTORY)).strip()
    out["start_percent"], out["end_percent"] = _window(params.get(WINDOW, "0-1"))
    out["exact"] = _bool(params.get(EXACT, False))
    out["shield_folder"] = str(params.get(SHIELDS, "")).strip()
    out["start_coupling"] = _coupling(params.get(COUPLING, "off"))
    out["init_image_shield"] = str(params.get(INIT_IMAGE, INIT_LEAVE)).strip()
    return out
