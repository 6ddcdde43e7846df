"""What the "Shielded sampling" accordion asks for, checked before a generation starts."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from guidance import history

SCRIPT = "Shielded sampling"
STATE_ATTRIBUTE = "shielded_sampling_state"    # the generation's ShieldedProcessing, kept on the WebUI's p
DEFAULT_HISTORY = "webui"
DEFAULT_HISTORY_CAP = history.DEFAULT_CAP
COUPLINGS = {"off": 0, "auto": -1, "1x1 (channel means)": 1, "2x2": 2, "4x4": 4, "8x8": 8}
AUTO_COORDINATES = 16   # "auto": the coarsest grid with at least this many coupled numbers per image (as in ComfyUI)
INIT_LEAVE = "leave it"            # img2img / inpaint from an image inside a shield (the ComfyUI node's choices)
INIT_EXCLUDE = "exclude it"
INIT_CHOICES = (INIT_LEAVE, INIT_EXCLUDE)


class SettingsError(ValueError):
    """A setting the user must change; the message names the control and the fix."""


@dataclass
class ShieldedSettings:
    enabled: bool = False
    radius_rms: float = 0.2
    overcompensation: float = 1.0
    intra_batch: bool = True
    history: bool = False
    history_name: str = DEFAULT_HISTORY
    start_percent: float = 0.0
    end_percent: float = 1.0
    exact: bool = False
    shield_folder: str = ""
    allow_unshielded: bool = False
    start_coupling: str = "off"
    activity_chart: bool = False
    init_image_shield: str = INIT_LEAVE

    @classmethod
    def from_args(cls, *values) -> "ShieldedSettings":
        """The script's positional UI values, in field order."""
        names = [f.name for f in fields(cls)]
        if len(values) > len(names):
            raise SettingsError(f"{SCRIPT}: got {len(values)} UI values for {len(names)} settings; the WebUI "
                                f"page is older than the extension: reload the page")
        return cls(**dict(zip(names, values)))

    def validate(self):
        def fail(control, msg):
            raise SettingsError(f"{SCRIPT}: '{control}' {msg}")
        if not (isinstance(self.radius_rms, (int, float)) and math.isfinite(self.radius_rms) and self.radius_rms > 0):
            fail("Radius", f"must be > 0 (got {self.radius_rms}); use a value such as 0.2")
        if not (math.isfinite(self.overcompensation) and self.overcompensation >= 1.0):
            fail("Overcompensation", f"must be >= 1 (got {self.overcompensation}); 1.0 is the paper's exact push")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            fail("Active window", f"must satisfy 0 <= start <= end <= 1 (got {self.start_percent}, {self.end_percent})")
        if self.history and not str(self.history_name).strip():
            fail("History name", "is empty; give the history a name such as 'webui'")
        if self.start_coupling not in COUPLINGS:
            fail("Start coupling", f"must be one of {list(COUPLINGS)}, got {self.start_coupling!r}")
        if self.init_image_shield not in INIT_CHOICES:
            fail("Input image inside a shield", f"must be one of {list(INIT_CHOICES)}, got {self.init_image_shield!r}")

    @property
    def spell_active(self) -> bool:
        """SPELL has something to repel from (the batch, the history or a shield folder)."""
        return self.intra_batch or self.history or bool(self.shield_folder.strip())


def raw_radius(radius_rms: float, elements: int) -> float:
    """Slider units (RMS distance per latent element, as the ComfyUI node) to the paper's raw L2 radius."""
    return radius_rms * math.sqrt(elements)


def coupling_grid(name: str, channels: int, height: int, width: int) -> int:
    """The start-coupling grid for a latent: 0 = off; "auto" = coarsest with >= 16 numbers per image."""
    grid = COUPLINGS[name]
    if grid == -1:
        grid = 1
        while channels * grid * grid < AUTO_COORDINATES:
            grid *= 2
    return min(grid, height, width)
