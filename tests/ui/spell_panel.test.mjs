// Unit tests of the panel's pure helpers (node --test tests/ui/spell_panel.test.mjs).
import assert from "node:assert/strict";
import test from "node:test";
import { calibrationLine, drawActivity, drawScale, fmt, radiusLine, rawRadius } from "../../web/spell_panel.js";

/** A 2D-context stand-in that records the rectangles and path points drawn. */
function recorder() {
  const calls = { rects: [], points: [], texts: [] };
  return {
    calls,
    clearRect() {}, beginPath() {}, stroke() {},
    fillRect(x, y, w, h) { calls.rects.push({ x, y, w, h, style: this.fillStyle }); },
    moveTo(x, y) { calls.points.push([x, y]); },
    lineTo(x, y) { calls.points.push([x, y]); },
    fillText(text) { calls.texts.push(text); },
  };
}

test("raw L2 radius is the slider radius times sqrt(elements)", () => {
  assert.equal(rawRadius(0.2, 4 * 64 * 64), 0.2 * 128);
  assert.equal(radiusLine(0.2, 16384), "raw L2 radius 25.6 (= 0.2 × √16384)");
  assert.match(radiusLine(0.2, 0), /known after a run or a calibration/);
});

test("number format keeps 4 significant digits and switches to exponents outside 1e-3..1e4", () => {
  assert.equal(fmt(25.6), "25.6");
  assert.equal(fmt(0.123456), "0.1235");
  assert.equal(fmt(123456), "1.23e+5");
  assert.equal(fmt(Infinity), "-");
});

test("calibration line gives the radius as a multiple of the median and flags VAE-space medians", () => {
  assert.equal(calibrationLine(0.1, { median: 0.4, model_space: true }), "calibrated median 0.4 · radius = 0.25 × median");
  assert.match(calibrationLine(0.1, { median: 0.4, model_space: false }), /VAE space!/);
  assert.match(calibrationLine(0.1, null), /no calibration yet/);
});

test("radius scale puts the median marker where the median is", () => {
  const ctx = recorder();
  const out = drawScale(ctx, 208, 12, 0.2, 0.4);
  assert.equal(out.top, 0.6000000000000001);
  assert.ok(Math.abs(out.medianX - (4 + (0.4 / 0.6) * 200)) < 1e-9);
  const marker = ctx.calls.rects.find((r) => r.style === "#e6781e");
  assert.ok(Math.abs(marker.x + 1.5 - out.medianX) < 1e-9);
});

test("activity chart draws one bar per corrected evaluation with height = corrected / batch", () => {
  const ctx = recorder();
  const activity = { corrected: [4, 2, 0, 1], batch: [4, 4, 4, 4], relative: [0.1, 0.05, 0, 0.2] };
  const out = drawActivity(ctx, 200, 100, activity);
  assert.equal(out.bars, 3);
  const bars = ctx.calls.rects.filter((r) => r.style === "#4682b4");
  assert.deepEqual(bars.map((b) => Math.round(b.h)), [84, 42, 21]);   // plot height 84 = 100 - 16
  assert.equal(ctx.calls.points.length, 4);
  assert.equal(Math.round(ctx.calls.points[3][1]), 0);                  // largest relative value at the top
  assert.match(ctx.calls.texts[0], /corrected on 3\/4 evals · max rel\. 20%/);
});
