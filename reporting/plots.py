"""Report figures drawn with PIL: SPELL activity (paper Fig. 5), nearest-shield panel (Fig. 7), DNG trace (DNG Fig. 5b).

PIL only (already a dependency): the figures are simple bar/line charts and image grids, so a plotting library
would add a large install for no gain. Every function returns a :class:`Figure` that also names where it drew
each part (``regions``: name -> box ``(x0, y0, x1, y1)``) and the legend lines it wrote, so tests can check the
pixels of each region and the numbers in the legend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
BAR = (70, 130, 180)           # corrected samples
LINE = (230, 120, 30)          # mean relative correction
LINE_MAX = (200, 60, 60)       # max relative correction
OUTSIDE = (40, 160, 70)        # output outside every shield
INSIDE = (210, 40, 40)         # output inside a shield
NEUTRAL = (150, 150, 150)      # no shield to compare with
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
FONT_SIZE = 13
TITLE_SIZE = 15
MAX_PANEL_ROWS = 16
MAX_GRID_ROWS = 32            # samples drawn in the activity chart's per-sample grid
GRID_CELL = 16                # row height of that grid


@dataclass
class Figure:
    image: Image.Image
    regions: dict = field(default_factory=dict)     # name -> (x0, y0, x1, y1)
    legend: list = field(default_factory=list)      # legend lines, in drawing order

    def to_array(self) -> np.ndarray:
        """``float32 [H, W, 3]`` in 0..1, the layout of one ComfyUI IMAGE."""
        return np.asarray(self.image.convert("RGB"), dtype=np.float32) / 255.0


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    """PIL's bundled scalable font when FreeType is available, else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt)
    return x1 - x0, y1 - y0


def draw_text(fig: Figure, draw, xy, text: str, fnt, fill=INK, name: str | None = None):
    """Write ``text`` at ``xy`` and remember its box under ``name``."""
    draw.text(xy, text, font=fnt, fill=fill)
    if name is not None:
        fig.regions[name] = tuple(int(v) for v in draw.textbbox(xy, text, font=fnt))


def nice_max(value: float) -> float:
    """Smallest 1/2/5 x 10^k at or above ``value`` (axis top)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        if m * exp >= value * (1 - 1e-9):
            return m * exp
    return 10 * exp


def pct(fraction: float) -> str:
    """A fraction as a percentage with at most 3 significant digits and no exponent."""
    v = 100 * fraction
    return f"{v:.0f}%" if abs(v) >= 1000 else f"{v:.3g}%"


# -- axes ----------------------------------------------------------------------------------------------
@dataclass
class Axes:
    box: tuple                      # plot area (x0, y0, x1, y1)
    n: int                          # number of x slots
    y_min: float = 0.0
    y_max: float = 1.0
    log: bool = False
    ticks: list | None = None       # explicit tick values (else 5 even ticks, or decades on a log axis)

    def x(self, i: float) -> float:
        x0, _, x1, _ = self.box
        return x0 + (i + 0.5) * (x1 - x0) / max(1, self.n)

    def slot(self) -> float:
        return (self.box[2] - self.box[0]) / max(1, self.n)

    def y(self, v: float) -> float:
        _, y0, _, y1 = self.box
        if self.log:
            lo, hi = math.log10(self.y_min), math.log10(self.y_max)
            v = math.log10(min(max(v, self.y_min), self.y_max))
        else:
            lo, hi = self.y_min, self.y_max
        frac = 0.0 if hi == lo else (v - lo) / (hi - lo)
        return y1 - min(max(frac, 0.0), 1.0) * (y1 - y0)


def y_ticks(ax: Axes) -> list[float]:
    if ax.ticks is not None:
        return ax.ticks
    if ax.log:
        lo, hi = math.ceil(math.log10(ax.y_min)), math.floor(math.log10(ax.y_max))
        return [10.0 ** k for k in range(lo, hi + 1)]
    return [ax.y_min + (ax.y_max - ax.y_min) * k / 4 for k in range(5)]


def draw_axes(fig: Figure, draw, ax: Axes, fnt, left_fmt, x_labels: list[str], right: Axes | None = None,
              right_fmt=None):
    x0, y0, x1, y1 = ax.box
    for v in y_ticks(ax):
        yy = ax.y(v)
        draw.line([(x0, yy), (x1, yy)], fill=GRID)
        label = left_fmt(v)
        w, h = text_size(draw, label, fnt)
        draw.text((x0 - w - 6, yy - h / 2 - 2), label, font=fnt, fill=INK)
    if right is not None:
        for v in y_ticks(right):
            yy = right.y(v)
            draw.text((x1 + 6, yy - 8), right_fmt(v), font=fnt, fill=LINE)
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    every = max(1, math.ceil(len(x_labels) / 16))
    for i, label in enumerate(x_labels):
        last = i == len(x_labels) - 1 and i % every >= every / 2
        if i % every == 0 or last:
            w, _ = text_size(draw, label, fnt)
            draw.text((ax.x(i) - w / 2, y1 + 4), label, font=fnt, fill=INK)


def draw_legend(fig: Figure, draw, x: int, y: int, entries: list[tuple[tuple, str]], fnt, line_gap: int = 18):
    """Colour swatch + text per entry, one per line; boxes stored as ``legend<i>`` / ``swatch<i>``."""
    for i, (colour, text) in enumerate(entries):
        yy = y + i * line_gap
        draw.rectangle([x, yy + 2, x + 12, yy + 12], fill=colour)
        fig.regions[f"swatch{i}"] = (x, yy + 2, x + 12, yy + 12)
        draw_text(fig, draw, (x + 18, yy), text, fnt, name=f"legend{i}")
        fig.legend.append(text)


def blank(width: int, height: int) -> tuple[Figure, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width, height), BACKGROUND)
    return Figure(image), ImageDraw.Draw(image)


# -- SPELL activity (paper Fig. 5) -----------------------------------------------------------------------
def activity_series(report, x_labels: str = "step") -> dict:
    """Per model evaluation: corrected count, batch, mean and max relative correction size (fractions)."""
    if x_labels not in ("step", "sigma"):
        raise ValueError(f"activity_chart: x_labels must be 'step' or 'sigma', got {x_labels!r}")
    steps = report.steps
    return {
        "corrected": [s.corrected for s in steps],
        "batch": [s.batch for s in steps],
        "mean": [sum(s.relative_size) / max(1, len(s.relative_size)) for s in steps],
        "max": [max(s.relative_size, default=0.0) for s in steps],
        "labels": [str(s.step) if x_labels == "step" else f"{s.sigma:.3g}" for s in steps],
    }


def activity_legend(report, series: dict) -> list[str]:
    active = sum(1 for c in series["corrected"] if c)
    peak = max(series["corrected"], default=0)
    batch = max(series["batch"], default=0)
    return [f"corrected samples: peak {peak}/{batch}, on {active} of {len(series['corrected'])} evaluations",
            f"mean correction / step size: max {pct(max(series['mean'], default=0.0))}",
            f"largest single correction: {pct(max(series['max'], default=0.0))}"]


def sample_grid_height(report) -> int:
    """Pixels the per-sample grid adds below the chart (caption, one row per sample, overflow line)."""
    batch = max((s.batch for s in report.steps), default=0)
    rows = min(batch, MAX_GRID_ROWS)
    if rows == 0:
        return 0
    return 30 + rows * GRID_CELL + (20 if batch > MAX_GRID_ROWS else 0) + 8


def activity_chart(report, width: int = 768, height: int = 400, x_labels: str = "step",
                   per_sample: bool = False) -> Figure:
    """Bars: samples corrected per evaluation (left axis); lines: relative correction size in % (right axis).

    ``x_labels``: "step" (sampler step) or "sigma" under each evaluation; ``per_sample``: a grid below the chart,
    one row per sample and one column per evaluation, filled where SPELL moved that sample (paper Fig. 5b).
    """
    series = activity_series(report, x_labels)
    fig, draw = blank(width, height + (sample_grid_height(report) if per_sample else 0))
    fnt, tfnt = font(), font(TITLE_SIZE)
    title = (f"SPELL activity  r = {report.radius_rms:.4g} rms ({report.radius:.4g} L2), "
             f"lambda = {report.overcompensation:.3g}")
    draw_text(fig, draw, (12, 8), title, tfnt, name="title")
    box = (60, 40, width - 80, height - 110)
    fig.regions["plot"] = box
    n = len(series["corrected"])
    if n == 0:
        draw.rectangle(box, outline=INK)
        draw_text(fig, draw, (box[0] + 20, (box[1] + box[3]) // 2), "no model evaluations recorded", fnt,
                  name="empty")
        return fig
    batch = max(series["batch"])
    step = max(1, math.ceil(batch / 8))
    left = Axes(box, n, 0.0, float(max(1, batch)), ticks=[float(k) for k in range(0, max(1, batch) + 1, step)])
    right = Axes(box, n, 0.0, nice_max(100 * max(series["max"])))
    draw_axes(fig, draw, left, fnt, lambda v: f"{v:.3g}", series["labels"], right, lambda v: pct(v / 100))
    draw_activity_series(fig, draw, series, left, right)
    axis = "sampler step" if x_labels == "step" else "sigma"
    draw.text((box[0], box[3] + 22), f"model evaluation (label: {axis}; noise high -> low)", font=fnt, fill=INK)
    entries = list(zip((BAR, LINE, LINE_MAX), activity_legend(report, series)))
    draw_legend(fig, draw, box[0], box[3] + 44, entries, fnt)
    if per_sample:
        draw_sample_grid(fig, draw, report, left, height, fnt)
    return fig


def draw_sample_grid(fig: Figure, draw, report, ax: Axes, top: int, fnt):
    """Rows = samples (numbered from 1), columns = the chart's evaluations; BAR where SPELL moved the sample."""
    batch = max(s.batch for s in report.steps)
    rows = min(batch, MAX_GRID_ROWS)
    draw_text(fig, draw, (12, top + 4), "per sample (rows) and evaluation (columns): filled = SPELL moved it", fnt,
              name="grid_caption")
    y0 = top + 30
    half = max(1.0, ax.slot() * 0.4)
    for b in range(rows):
        y = y0 + b * GRID_CELL
        label = str(b + 1)
        w, _ = text_size(draw, label, fnt)
        draw.text((ax.box[0] - w - 8, y), label, font=fnt, fill=INK)
        for i, s in enumerate(report.steps):
            moved = b < len(s.active) and s.active[b]
            cell = (ax.x(i) - half, y + 1, ax.x(i) + half, y + GRID_CELL - 3)
            draw.rectangle(cell, fill=BAR if moved else GRID)
            fig.regions[f"cell{b}_{i}"] = tuple(round(v) for v in cell)
    fig.regions["grid"] = (int(ax.x(0) - half), y0, math.ceil(ax.x(ax.n - 1) + half), y0 + rows * GRID_CELL)
    if batch > rows:
        draw_text(fig, draw, (ax.box[0], y0 + rows * GRID_CELL + 2), f"... and {batch - rows} more samples", fnt,
                  name="grid_more")


def draw_activity_series(fig: Figure, draw, series: dict, left: Axes, right: Axes):
    half = max(1.0, left.slot() * 0.35)
    bars = []
    for i, c in enumerate(series["corrected"]):
        if c:
            bar = (left.x(i) - half, left.y(c), left.x(i) + half, left.y(0))
            draw.rectangle(bar, fill=BAR)
            bars.append(bar)
    fig.regions["bars"] = bounding(bars)
    for key, colour, width in (("max", LINE_MAX, 1), ("mean", LINE, 3)):
        points = [(right.x(i), right.y(100 * v)) for i, v in enumerate(series[key])]
        if len(points) > 1:
            draw.line(points, fill=colour, width=width)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        fig.regions[f"line_{key}"] = bounding([(px - 2, py - 2, px + 2, py + 2) for px, py in points])


def bounding(boxes) -> tuple | None:
    boxes = list(boxes)
    if not boxes:
        return None
    return (int(min(b[0] for b in boxes)), int(min(b[1] for b in boxes)),
            int(math.ceil(max(b[2] for b in boxes))), int(math.ceil(max(b[3] for b in boxes))))


# -- nearest-shield panel (paper Fig. 7) -----------------------------------------------------------------
def output_lines(report, record, shield_label) -> tuple[list[str], tuple]:
    """Text and frame colour of one output row."""
    rms = math.sqrt(max(1, report.elements))
    d = record.distance
    lines = [f"output {record.index}"]
    repelled = f"repelled: {'yes' if record.repelled else 'no'}"
    if not math.isfinite(d) and not (report.shield_count or report.history_count):
        return lines + [report.no_nearest_text(), repelled], NEUTRAL
    inside = d < report.inside_limit()
    if not math.isfinite(d):  # shields exist, none within the search's reach (> r): outside every one
        lines += [report.no_nearest_text(), repelled, "outside every shield"]
    else:
        lines.append(f"nearest: shield {shield_label(record.nearest_shield)}" if record.nearest_shield >= 0
                     else "nearest: an earlier output (history)")
        lines += [f"distance {d / rms:.4g} rms ({d:.4g} L2) = {d / report.radius:.3g} r", repelled,
                  "INSIDE the shield" if inside else "outside every shield"]
    jump = getattr(record, "final_jump", 0.0)
    lines.append(f"by {getattr(record, 'protected_by', 'loop')}: t=0 jump {100 * jump:.2g}% of the latent")
    return lines, INSIDE if inside else OUTSIDE


def nearest_placeholder(record) -> str:
    """What the nearest-shield tile says without a thumbnail: a shield without one, an earlier output (history
    has no thumbnails), or nothing within the search's reach."""
    if record.nearest_shield >= 0:
        return "no thumbnail"
    return "earlier output" if math.isfinite(record.distance) else "no shield"


def fit(image: np.ndarray | None, size: int) -> Image.Image | None:
    if image is None:
        return None
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr[..., :3])
    factor = size / max(pil.width, pil.height)
    new = (max(1, round(pil.width * factor)), max(1, round(pil.height * factor)))
    return pil.resize(new, Image.Resampling.LANCZOS)


def paste_tile(fig: Figure, draw, tile: Image.Image | None, x: int, y: int, size: int, frame, name: str, fnt,
               missing: str):
    draw.rectangle([x - 3, y - 3, x + size + 2, y + size + 2], outline=frame, width=3)
    if tile is None:
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=(240, 240, 240))
        draw.text((x + 8, y + size // 2 - 8), missing, font=fnt, fill=NEUTRAL)
    else:
        fig.image.paste(tile, (x + (size - tile.width) // 2, y + (size - tile.height) // 2))
    fig.regions[name] = (x, y, x + size, y + size)


def shield_panel(report, outputs=None, thumbnails: dict | None = None, labels: list | None = None,
                 tile: int = 160, text_width: int = 360) -> Figure:
    """One row per output: output image | nearest shield thumbnail | distance, ratio to r, repelled flag.

    ``outputs``: images ``[B, H, W, 3]`` (uint8 or 0..1 floats) or None; ``thumbnails``: shield index ->
    image; ``labels``: per-shield names.
    """
    thumbnails = thumbnails or {}
    records = report.outputs[:MAX_PANEL_ROWS]
    fnt, tfnt = font(), font(TITLE_SIZE)
    row_h, head = tile + 16, 34
    width = 3 * 16 + 2 * tile + text_width
    height = head + max(1, len(records)) * row_h + (22 if len(report.outputs) > MAX_PANEL_ROWS else 0) + 8
    fig, draw = blank(width, height)
    name = report.shield_set_name or "shields"
    draw_text(fig, draw, (12, 8), f"Nearest shield per output  ({name}: {report.shield_count} shields, "
              f"{report.history_count} in history, r = {report.radius_rms:.4g} rms)", tfnt, name="title")
    if not records:
        draw_text(fig, draw, (16, head + 8), "no outputs recorded (run did not reach sigma = 0)", fnt, name="empty")
        return fig

    def shield_label(k):
        return f"#{k}" + (f" ({labels[k]})" if labels and k < len(labels) and labels[k] else "")

    for row, rec in enumerate(records):
        draw_output_row(fig, draw, report, rec, row, head + row * row_h, tile, outputs, thumbnails, shield_label,
                        fnt)
    if len(report.outputs) > MAX_PANEL_ROWS:
        draw.text((16, height - 28), f"... and {len(report.outputs) - MAX_PANEL_ROWS} more outputs", font=fnt,
                  fill=INK)
    return fig


def draw_output_row(fig, draw, report, rec, row, y, tile, outputs, thumbnails, shield_label, fnt):
    lines, frame = output_lines(report, rec, shield_label)
    out_img = fit(outputs[rec.index], tile) if outputs is not None and rec.index < len(outputs) else None
    paste_tile(fig, draw, out_img, 16, y, tile, frame, f"output{row}", fnt, "no image")
    shield_img = fit(thumbnails.get(rec.nearest_shield), tile) if rec.nearest_shield >= 0 else None
    paste_tile(fig, draw, shield_img, 32 + tile, y, tile, frame, f"shield{row}", fnt, nearest_placeholder(rec))
    for k, text in enumerate(lines):
        colour = frame if text in ("INSIDE the shield", "outside every shield") and frame != NEUTRAL else INK
        draw_text(fig, draw, (48 + 2 * tile, y + 4 + 20 * k), text, fnt, fill=colour, name=f"row{row}_line{k}")
        fig.legend.append(text)


# -- DNG trace (DNG paper Fig. 5b) -----------------------------------------------------------------------
def dng_legend(trace, max_entries: int = 8) -> list[str]:
    batch = len(trace.posterior[0]) if trace.posterior else 0
    lines = []
    for b in range(min(batch, max_entries)):
        peak = max(row[b] for row in trace.scale)
        lines.append(f"sample {b}: peak scale {peak:.3g}, final posterior {trace.posterior[-1][b]:.3g}")
    if batch > max_entries:
        lines.append(f"... {batch - max_entries} more samples")
    return lines


def dng_chart(trace, width: int = 768, height: int = 560) -> Figure:
    """Top: posterior p(c-|x_t) per sample (log axis); bottom: applied guidance scale per sample."""
    fig, draw = blank(width, height)
    fnt, tfnt = font(), font(TITLE_SIZE)
    draw_text(fig, draw, (12, 8), f"DNG ({trace.mode})  lam0 = {trace.lam0:.3g}, prior = {trace.prior:.3g}, "
              f"p in [{trace.p_min:.2g}, {trace.p_max:.2g}]", tfnt, name="title")
    n = len(trace.sigmas)
    top, bottom = (70, 56, width - 20, 210), (70, 250, width - 20, 400)
    fig.regions["posterior_plot"], fig.regions["scale_plot"] = top, bottom
    if n == 0:
        draw_text(fig, draw, (top[0] + 20, top[1] + 60), "no sampling run recorded", fnt, name="empty")
        return fig
    post = np.asarray(trace.posterior, dtype=np.float64)
    scale = np.asarray(trace.scale, dtype=np.float64)
    floor = max(1e-12, min(float(post[post > 0].min()) if (post > 0).any() else 1e-6, trace.p_min or 1.0))
    pax = Axes(top, n, 10.0 ** math.floor(math.log10(floor)), 1.0, log=True)
    sax = Axes(bottom, n, 0.0, nice_max(float(scale.max())))
    labels = [str(i) for i in range(n)]
    draw_axes(fig, draw, pax, fnt, lambda v: f"{v:.0e}", labels)
    draw_axes(fig, draw, sax, fnt, lambda v: f"{v:.3g}", labels)
    draw.text((top[0], top[1] - 16), "posterior p(c- | x_t)", font=fnt, fill=INK)
    draw.text((bottom[0], bottom[1] - 16), "guidance scale lambda_t", font=fnt, fill=INK)
    draw.text((bottom[0], bottom[3] + 20), "step (noise high -> low)", font=fnt, fill=INK)
    for b in range(post.shape[1]):
        colour = PALETTE[b % len(PALETTE)]
        draw_series(draw, pax, post[:, b], colour)
        draw_series(draw, sax, scale[:, b], colour)
    legend = dng_legend(trace)
    entries = [(PALETTE[i % len(PALETTE)] if i < post.shape[1] else NEUTRAL, t) for i, t in enumerate(legend)]
    draw_legend(fig, draw, bottom[0], bottom[3] + 40, entries[:6], fnt)
    if len(entries) > 6:
        draw_legend_column(fig, draw, width // 2 + 20, bottom[3] + 40, entries[6:], fnt)
    return fig


def draw_series(draw, ax: Axes, values, colour, width: int = 2):
    points = [(ax.x(i), ax.y(float(v))) for i, v in enumerate(values)]
    if len(points) > 1:
        draw.line(points, fill=colour, width=width)
    for px, py in points:
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)


def draw_legend_column(fig, draw, x, y, entries, fnt):
    offset = len(fig.legend)
    for i, (colour, text) in enumerate(entries):
        yy = y + i * 18
        draw.rectangle([x, yy + 2, x + 12, yy + 12], fill=colour)
        draw_text(fig, draw, (x + 18, yy), text, fnt, name=f"legend{offset + i}")
        fig.legend.append(text)
