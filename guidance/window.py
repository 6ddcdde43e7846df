"""The active window of a guidance: the noise levels ``end <= sigma <= start`` it acts on, from the schedule
fractions ``start_percent <= end_percent`` (0 = the first step, 1 = the last). One definition for every host."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


def check_percents(where: str, start_percent: float, end_percent: float) -> None:
    """``start_percent``/``end_percent`` must satisfy ``0 <= start <= end <= 1``; ``where`` names the inputs."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"{where} must satisfy 0 <= start <= end <= 1 (got {start_percent}, {end_percent}); "
                         f"0 and 1 act on every step")


@dataclass(frozen=True)
class SigmaWindow:
    """The noise levels ``end <= sigma <= start`` a guidance acts on (sigma falls as sampling proceeds)."""

    start: float = math.inf
    end: float = 0.0

    @classmethod
    def of(cls, percent_to_sigma: Callable[[float], float], start_percent: float,
           end_percent: float) -> "SigmaWindow":
        """The window of a model's percent -> sigma map; the ends of the schedule are open (inf, 0)."""
        start = math.inf if start_percent <= 0.0 else float(percent_to_sigma(start_percent))
        end = 0.0 if end_percent >= 1.0 else float(percent_to_sigma(end_percent))
        return cls(start, end)

    def __contains__(self, sigma: float) -> bool:
        return self.end <= sigma <= self.start
