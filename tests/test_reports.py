"""Report figures (reporting.plots) drawn from known report objects: sizes, plot pixels, legend numbers."""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from reporting import plots
from guidance.spell_record import OutputRecord, SpellReport, StepRecord

CORRECTED = [4, 4, 3, 2, 0, 1, 0, 0]
RELATIVE = [[0.10, 0.20, 0.05, 0.05], [0.05, 0.05, 0.05, 0.05], [0.0, 0.1, 0.1, 0.1], [0.0, 0.0, 0.25, 0.05],
            [0.0] * 4, [0.0, 0.0, 0.0, 0.08], [0.0] * 4, [0.0] * 4]


def spell_report() -> SpellReport:
    rep = SpellReport(radius=25.6, radius_rms=0.2, overcompensation=1.0, elements=16384,
                      sigmas=[14.6 - i for i in range(8)] + [0.0], shield_count=6, history_count=0,
                      intra_batch=True, shield_set_name="folder")
    for i, (c, rel) in enumerate(zip(CORRECTED, RELATIVE)):
        rep.steps.append(StepRecord(step=i, sigma=14.6 - i, corrected=c, batch=4, relative_size=rel,
                                    nearest=[30.0] * 4))
    rep.outputs = [OutputRecord(0, 2, 30.0, True), OutputRecord(1, 5, 20.0, False),
                   OutputRecord(2, -1, 27.0, True), OutputRecord(3, -1, math.inf, False)]
    return rep


def pixels(fig, box) -> np.ndarray:
    return np.asarray(fig.image.crop(box)).reshape(-1, 3)


def share_of(fig, box, colour, tol=10) -> float:
    px = pixels(fig, box).astype(int)
    return float((np.abs(px - np.array(colour)).max(axis=1) <= tol).mean())


def assert_text_drawn(fig, name, text, size=plots.FONT_SIZE):
    """The region holds exactly what PIL draws for ``text`` with the figure's font (pixel for pixel)."""
    box = fig.regions[name]
    fnt = plots.font(size)
    ref = Image.new("RGB", fig.image.size, plots.BACKGROUND)
    draw = ImageDraw.Draw(ref)
    off = draw.textbbox((0, 0), text, font=fnt)
    colour_px = pixels(fig, box).astype(int)
    ink = colour_px[np.abs(colour_px - 255).max(axis=1) > 60]
    colour = tuple(int(v) for v in ink[np.argmin(ink.sum(1))]) if len(ink) else plots.INK
    draw.text((box[0] - off[0], box[1] - off[1]), text, font=fnt, fill=colour)
    got = np.asarray(fig.image.crop(box)).astype(int)
    want = np.asarray(ref.crop(box)).astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 2, f"region {name!r} does not show {text!r}"


# -- activity chart -----------------------------------------------------------------------------------
def test_activity_chart_size_bars_and_lines():
    fig = plots.activity_chart(spell_report(), width=768, height=400)
    assert fig.image.size == (768, 400)
    x0, y0, x1, y1 = fig.regions["plot"]
    n, batch = len(CORRECTED), 4
    for i, c in enumerate(CORRECTED):
        cx = int(x0 + (i + 0.5) * (x1 - x0) / n)
        column = np.asarray(fig.image)[y0 + 1:y1, cx - 3]
        rows = np.flatnonzero(np.abs(column.astype(int) - plots.BAR).max(axis=1) <= 10)
        height = 0 if rows.size == 0 else rows[-1] - rows[0] + 2     # lines may cross the bar: use its extent
        expect = c / batch * (y1 - y0)
        assert abs(height - expect) <= 3, (i, height, expect)        # bar height = corrected / batch
    assert share_of(fig, fig.regions["line_mean"], plots.LINE) > 0.02
    assert share_of(fig, fig.regions["line_max"], plots.LINE_MAX) > 0.005
    # right axis 0..50% (nice top above the 25% maximum): mean peaks at 10% (step 0), max at 25% (step 3)
    assert abs(fig.regions["line_mean"][1] + 2 - (y1 - 0.10 / 0.50 * (y1 - y0))) <= 2
    assert abs(fig.regions["line_max"][1] + 2 - (y1 - 0.25 / 0.50 * (y1 - y0))) <= 2


def test_activity_chart_legend_numbers():
    fig = plots.activity_chart(spell_report())
    assert fig.legend == ["corrected samples: peak 4/4, on 5 of 8 evaluations",
                          "mean correction / step size: max 10%",
                          "largest single correction: 25%"]
    for i, text in enumerate(fig.legend):
        assert_text_drawn(fig, f"legend{i}", text)
    assert share_of(fig, fig.regions["swatch0"], plots.BAR) > 0.9
    assert_text_drawn(fig, "title", "SPELL activity  r = 0.2 rms (25.6 L2), lambda = 1", plots.TITLE_SIZE)


def test_activity_chart_without_steps_says_so():
    rep = spell_report()
    rep.steps = []
    fig = plots.activity_chart(rep)
    assert "bars" not in fig.regions
    assert_text_drawn(fig, "empty", "no model evaluations recorded")


def test_activity_chart_per_sample_grid_fills_exactly_the_moved_cells():
    rep = spell_report()
    for s, rel in zip(rep.steps, RELATIVE):
        s.active = [r > 0 for r in rel]
    fig = plots.activity_chart(rep, width=768, height=400, per_sample=True)
    assert fig.image.size == (768, 400 + plots.sample_grid_height(rep)) and plots.sample_grid_height(rep) > 4 * 16
    x0, _, x1, y1 = fig.regions["plot"]
    for b in range(4):
        for i, s in enumerate(rep.steps):
            cx0, cy0, cx1, cy1 = fig.regions[f"cell{b}_{i}"]
            assert cy0 > y1 and x0 <= cx0 < cx1 <= x1                  # below the chart, in its evaluation's column
            assert abs((cx0 + cx1) / 2 - (x0 + (i + 0.5) * (x1 - x0) / len(rep.steps))) <= 1
            want = plots.BAR if s.active[b] else plots.GRID
            assert share_of(fig, (cx0 + 2, cy0 + 2, cx1 - 2, cy1 - 2), want, tol=0) == 1.0, (b, i)
    assert_text_drawn(fig, "grid_caption", "per sample (rows) and evaluation (columns): filled = SPELL moved it")
    assert "cell0_0" not in plots.activity_chart(rep).regions      # the nodes' chart keeps its layout


def test_activity_chart_labels_evaluations_by_sigma_on_request():
    rep = spell_report()
    by_step = np.asarray(plots.activity_chart(rep).image)
    by_sigma = np.asarray(plots.activity_chart(rep, x_labels="sigma").image)
    _, _, _, y1 = plots.activity_chart(rep).regions["plot"]
    assert (by_step[:y1] == by_sigma[:y1]).all() and (by_step[y1:] != by_sigma[y1:]).any()
    assert plots.activity_series(rep, "sigma")["labels"][:2] == ["14.6", "13.6"]
    with pytest.raises(ValueError, match="x_labels must be 'step' or 'sigma'"):
        plots.activity_chart(rep, x_labels="time")


def test_activity_chart_draws_a_sampler_api_run():
    from guidance.sampling import SpellWrapper, karras_sigmas, sample
    wrapped = SpellWrapper(lambda x, sigma: torch.zeros_like(x), radius=lambda s: 2.0 if s > 1.0 else 0.0,
                           shields=torch.tensor([[0.5, 0.0, 0.0, 0.0]]))
    sigmas = karras_sigmas(5, 0.01, 10.0)
    sample(wrapped, torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), sigmas)
    rep = wrapped.runs[-1]
    on = int((sigmas[:-1] > 1.0).sum())
    fig = plots.activity_chart(rep, x_labels="sigma", per_sample=True)
    assert fig.legend[0] == f"corrected samples: peak 3/3, on {on} of 5 evaluations"
    assert_text_drawn(fig, "title", "SPELL activity  r = 1 rms (2 L2), lambda = 1", plots.TITLE_SIZE)
    for (i, b), moved in np.ndenumerate(rep.active_matrix().numpy()):
        cx0, cy0, cx1, cy1 = fig.regions[f"cell{b}_{i}"]
        want = plots.BAR if moved else plots.GRID
        assert share_of(fig, (cx0 + 2, cy0 + 2, cx1 - 2, cy1 - 2), want, tol=0) == 1.0
    assert rep.active_matrix().tolist() == [[s > 1.0] * 3 for s in sigmas[:-1].tolist()]


# -- nearest-shield panel ------------------------------------------------------------------------------
def solid(colour, size=24):
    return np.tile(np.array(colour, dtype=np.uint8), (size, size, 1))


def test_shield_panel_tiles_frames_and_text():
    rep = spell_report()
    outputs = np.stack([solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255)), solid((255, 255, 0))])
    fig = plots.shield_panel(rep, outputs.astype(np.float32) / 255, {2: solid((0, 0, 0), 12)},
                             labels=["a", "b", "cat.png", "d", "e", "f"], tile=100, text_width=300)
    assert fig.image.size == (3 * 16 + 200 + 300, 34 + 4 * 116 + 8)
    for row, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        assert share_of(fig, fig.regions[f"output{row}"], colour) > 0.95      # output image fills its tile
    assert share_of(fig, fig.regions["shield0"], (0, 0, 0)) > 0.95         # thumbnail upscaled into the tile
    assert share_of(fig, fig.regions["shield1"], (240, 240, 240)) > 0.8    # no thumbnail for shield 5
    frame = lambda row: (fig.regions[f"output{row}"][0] - 2, fig.regions[f"output{row}"][1] + 50)
    assert fig.image.getpixel(frame(0)) == plots.OUTSIDE                   # 30 > r = 25.6
    assert fig.image.getpixel(frame(1)) == plots.INSIDE                    # 20 < r
    assert fig.image.getpixel(frame(3)) == plots.OUTSIDE                   # no shield within 2 r > r
    assert fig.legend[:5] == ["output 0", "nearest: shield #2 (cat.png)",
                              "distance 0.2344 rms (30 L2) = 1.17 r", "repelled: yes", "outside every shield"]
    assert "distance 0.1562 rms (20 L2) = 0.781 r" in fig.legend
    assert "INSIDE the shield" in fig.legend
    assert "nearest: an earlier output (history)" in fig.legend
    assert "no shield within 2 r" in fig.legend                            # shields exist, none within reach
    assert [plots.nearest_placeholder(o) for o in rep.outputs] == ["no thumbnail", "no thumbnail",
                                                                     "earlier output", "no shield"]
    assert_text_drawn(fig, "row0_line2", "distance 0.2344 rms (30 L2) = 1.17 r")
    assert_text_drawn(fig, "row1_line4", "INSIDE the shield")


def test_shield_panel_row_without_a_shield_in_reach():
    """Shields exist but none lies within the nearest search's reach (2 r): the output is outside every shield."""
    rep = spell_report()
    lines, frame = plots.output_lines(rep, rep.outputs[3], str)
    assert frame == plots.OUTSIDE
    assert lines[:4] == ["output 3", "no shield within 2 r", "repelled: no", "outside every shield"]
    assert lines[4].startswith("by loop: t=0 jump")
    rep.shield_count = 0                                                     # no shield and no history at all
    lines, frame = plots.output_lines(rep, rep.outputs[3], str)
    assert frame == plots.NEUTRAL and lines == ["output 3", "no shield or history", "repelled: no"]
    rep.history_count = 2                                                    # earlier outputs only
    assert plots.output_lines(rep, rep.outputs[3], str)[1] == plots.OUTSIDE


def test_shield_panel_caps_rows_and_handles_missing_images():
    rep = spell_report()
    rep.outputs = [OutputRecord(i, 0, 30.0, False) for i in range(plots.MAX_PANEL_ROWS + 3)]
    fig = plots.shield_panel(rep, None, None, tile=40, text_width=300)
    assert f"output{plots.MAX_PANEL_ROWS - 1}" in fig.regions and f"output{plots.MAX_PANEL_ROWS}" not in fig.regions
    assert share_of(fig, fig.regions["output0"], (240, 240, 240)) > 0.5


# -- DNG chart -----------------------------------------------------------------------------------------
def dng_trace():
    dng = pytest.importorskip("guidance.dng")
    trace = dng.DngTrace(lam0=10.0, p_min=1e-6, p_max=0.9, prior=0.01, mode="dynamic")
    steps = 12
    trace.sigmas = [14.0 - i for i in range(steps)]
    trace.posterior = [[min(0.9, 0.01 * math.exp(0.5 * i)), max(1e-6, 0.01 * math.exp(-1.0 * i))] for i in range(steps)]
    trace.scale = [[10 * p / (1 - p) for p in row] for row in trace.posterior]
    return trace


def test_dng_chart_curves_per_sample_and_legend():
    trace = dng_trace()
    fig = plots.dng_chart(trace, width=768, height=560)
    assert fig.image.size == (768, 560)
    for name in ("posterior_plot", "scale_plot"):
        assert share_of(fig, fig.regions[name], plots.PALETTE[0]) > 0.003
    assert share_of(fig, fig.regions["posterior_plot"], plots.PALETTE[1]) > 0.003
    # sample 0's scale rises to the top of the scale axis: its colour appears in the top tenth of the plot
    x0, y0, x1, y1 = fig.regions["scale_plot"]
    assert share_of(fig, (x0, y0, x1, y0 + (y1 - y0) // 10), plots.PALETTE[0]) > 0.001
    assert fig.legend == ["sample 0: peak scale 90, final posterior 0.9",
                          "sample 1: peak scale 0.101, final posterior 1e-06"]
    assert_text_drawn(fig, "legend0", fig.legend[0])
    assert_text_drawn(fig, "legend1", fig.legend[1])


def test_dng_chart_empty_trace():
    dng = pytest.importorskip("guidance.dng")
    fig = plots.dng_chart(dng.DngTrace(lam0=5.0))
    assert fig.legend == []
    assert_text_drawn(fig, "empty", "no sampling run recorded")


def test_figure_to_array_is_comfy_image_layout():
    arr = plots.activity_chart(spell_report(), width=300, height=250).to_array()
    assert arr.shape == (250, 300, 3) and arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0 and arr.min() < 0.5


def test_nice_max():
    assert [plots.nice_max(v) for v in (0.7, 1.0, 1.3, 3, 7, 12.5, 0)] == [1, 1, 2, 5, 10, 20, 1.0]
