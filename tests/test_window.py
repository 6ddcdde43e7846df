"""The one sigma window: open ends of the schedule, the model's map in between, the input check."""
import math

import pytest

from guidance.window import SigmaWindow, check_percents


def test_window_maps_percents_and_keeps_the_ends_open():
    w = SigmaWindow.of(lambda p: 10.0 * (1 - p), 0.25, 0.75)
    assert (w.start, w.end) == (7.5, 2.5)
    assert 7.5 in w and 2.5 in w and 5.0 in w and 7.6 not in w and 2.4 not in w
    full = SigmaWindow.of(lambda p: 1 / 0, 0.0, 1.0)           # the map is not even asked at the ends
    assert full == SigmaWindow() and math.inf in full and 0.0 in full


def test_percents_out_of_order_name_the_inputs():
    with pytest.raises(ValueError, match=r"My node: inputs 'a'/'b' must satisfy 0 <= start <= end <= 1 \(got 0.8, 0.2\)"):
        check_percents("My node: inputs 'a'/'b'", 0.8, 0.2)
    check_percents("x", 0.0, 1.0)
