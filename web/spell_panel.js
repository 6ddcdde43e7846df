// Pure helpers of the SPELL node panel: numbers, the radius scale with its calibration marker, the activity chart.
// No ComfyUI imports here, so the file is easy to read and to lint on its own.

export const CHART_HEIGHT = 90;

/** Tooltips of the panel elements (the UI tests read them from here). */
export const TOOLTIPS = {
  l2: "Raw L2 radius = slider radius × √(elements of one latent), the radius the SPELL paper quotes. " +
    "The latent size is read from the last run of this node or from the last calibration.",
  scale: "Radius (blue) on a scale from 0, with the last calibrated median pairwise distance (orange marker).",
  calibration: "Last result of SPELL Radius Calibration: the median pairwise distance of an unguided batch " +
    "in slider units. The paper searched radii from 0 to 2× this median.",
  requeue: "Queue the workflow again when the radius slider is released (debounced). Off by default.",
  activity: "Last run: bars = share of the batch corrected at each model evaluation, " +
    "line = mean correction size relative to the step (SPELL paper Fig. 5).",
  calibrationResult: "Median pairwise distance of the input batch and the suggested radius.",
};

/** Raw L2 radius of the paper from the slider's RMS-per-element radius. */
export function rawRadius(radiusRms, elements) {
  return radiusRms * Math.sqrt(elements);
}

/** Short number for labels. */
export function fmt(value) {
  if (!Number.isFinite(value)) return "-";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e4 || abs < 1e-3)) return value.toExponential(2);
  return Number(value.toPrecision(4)).toString();
}

/** Text of the radius line: raw L2 radius when the latent size is known. */
export function radiusLine(radiusRms, elements) {
  if (!elements) return `radius ${fmt(radiusRms)} rms · L2 known after a run or a calibration`;
  return `raw L2 radius ${fmt(rawRadius(radiusRms, elements))} (= ${fmt(radiusRms)} × √${elements})`;
}

/** Text of the calibration line. */
export function calibrationLine(radiusRms, calibration) {
  if (!calibration) return "no calibration yet (SPELL Radius Calibration)";
  const ratio = radiusRms / calibration.median;
  const where = calibration.model_space ? "" : " (VAE space!)";
  return `calibrated median ${fmt(calibration.median)}${where} · radius = ${fmt(ratio)} × median`;
}

/** Draws the radius scale: 0 .. top, the radius as a bar, the calibrated median as a marker. */
export function drawScale(ctx, width, height, radiusRms, median) {
  const top = Math.max(radiusRms, median || 0) * 1.5 || 1;
  const x = (v) => 4 + (v / top) * (width - 8);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#3a3f47";
  ctx.fillRect(4, height / 2 - 3, width - 8, 6);
  ctx.fillStyle = "#4682b4";
  ctx.fillRect(4, height / 2 - 3, x(radiusRms) - 4, 6);
  if (median) {
    ctx.fillStyle = "#e6781e";
    ctx.fillRect(x(median) - 1.5, 0, 3, height);
  }
  return { top, radiusX: x(radiusRms), medianX: median ? x(median) : null };
}

/** Draws the activity chart: bars = corrected / batch per evaluation, line = mean relative correction. */
export function drawActivity(ctx, width, height, activity) {
  const n = activity.corrected.length;
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#1e2126";
  ctx.fillRect(0, 0, width, height);
  const plotH = height - 16;
  if (n === 0) {
    ctx.fillStyle = "#bbb";
    ctx.font = "11px sans-serif";
    ctx.fillText("no evaluations recorded", 6, plotH / 2);
    return { bars: 0 };
  }
  const slot = width / n;
  const relMax = Math.max(0, ...activity.relative);
  const relTop = relMax || 1;
  let bars = 0;
  ctx.fillStyle = "#4682b4";
  activity.corrected.forEach((c, i) => {
    const frac = c / Math.max(1, activity.batch[i]);
    if (c > 0) {
      bars += 1;
      ctx.fillRect(i * slot + slot * 0.15, plotH * (1 - frac), Math.max(1, slot * 0.7), plotH * frac);
    }
  });
  ctx.strokeStyle = "#e6781e";
  ctx.lineWidth = 2;
  ctx.beginPath();
  activity.relative.forEach((r, i) => {
    const px = (i + 0.5) * slot;
    const py = plotH * (1 - r / relTop);
    if (i === 0) ctx.moveTo(px, py);
    else ctx.lineTo(px, py);
  });
  ctx.stroke();
  ctx.fillStyle = "#ccc";
  ctx.font = "10px sans-serif";
  const active = activity.corrected.filter((c) => c > 0).length;
  ctx.fillText(`corrected on ${active}/${n} evals · max rel. ${fmt(100 * relMax)}%`, 4, height - 4);
  return { bars };
}
