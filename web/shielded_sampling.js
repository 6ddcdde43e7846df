// ComfyUI front-end extension of the shielded & diverse sampling pack.
// On this pack's SPELL nodes only: the raw L2 radius beside the resolution-free slider, the last calibrated
// median as a marker, the activity chart after a run, and an optional (off by default) re-queue when the
// radius slider is released. Every node handler it touches is chained, never replaced.
import { app } from "../../scripts/app.js";
import { CHART_HEIGHT, TOOLTIPS, calibrationLine, drawActivity, drawScale, radiusLine } from "./spell_panel.js";

const EXTENSION = "shielded_sampling.spell_panel";
const SPELL_NODES = new Set(["ShieldedApplySpell", "ShieldedSpellSampler"]);
const CALIBRATION_NODE = "ShieldedSpellRadiusCalibration";
const PANEL_WIDGET = "spell_radius_panel";
const CALIBRATION_WIDGET = "spell_calibration_result";
const REQUEUE_PROPERTY = "shielded_requeue_on_release";
const REQUEUE_DELAY_MS = 700;
const LINE = 15;


const calibrationState = { last: null };
const livePanels = new Set();
let pointerDown = false;

function chain(target, name, after) {
  const original = target[name];
  target[name] = function chained(...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function el(tag, className, title, style) {
  const node = document.createElement(tag);
  node.className = className;
  if (title) node.title = title;
  Object.assign(node.style, style || {});
  return node;
}

function buildPanel() {
  const root = el("div", "shielded-spell-panel", null,
    { font: "11px sans-serif", color: "var(--input-text, #ddd)", padding: "2px 4px", overflow: "hidden" });
  const l2 = el("div", "shielded-radius-l2", TOOLTIPS.l2, { height: `${LINE}px`, whiteSpace: "nowrap" });
  const scale = el("canvas", "shielded-radius-scale", TOOLTIPS.scale, { width: "100%", height: "12px" });
  const calibration = el("div", "shielded-calibration", TOOLTIPS.calibration,
    { height: `${LINE}px`, whiteSpace: "nowrap" });
  const requeue = el("label", "shielded-requeue", TOOLTIPS.requeue, { display: "block", height: `${LINE + 3}px` });
  const checkbox = el("input", "shielded-requeue-toggle", TOOLTIPS.requeue);
  checkbox.type = "checkbox";
  requeue.append(checkbox, document.createTextNode(" re-queue on slider release"));
  const chart = el("canvas", "shielded-activity", TOOLTIPS.activity,
    { width: "100%", height: `${CHART_HEIGHT}px`, display: "none" });
  root.append(l2, scale, calibration, requeue, chart);
  return { root, l2, scale, calibration, checkbox, chart };
}

function panelHeight(panel) {
  return 2 * LINE + 12 + LINE + 3 + 24 + (panel.activity ? CHART_HEIGHT + 6 : 0);
}

function sizedContext(canvas, cssHeight) {
  const width = Math.max(40, canvas.clientWidth || 200);
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { ctx, width };
}

/** The radius the node uses: the widget's value, or the last run's when the radius comes in through a link. */
function radiusOf(node) {
  const linked = node.inputs?.some((i) => i.name === "radius" && i.link !== null && i.link !== undefined);
  const fromRun = node.shieldedPanel?.activity?.radius_rms;
  if (linked && Number.isFinite(fromRun)) return fromRun;
  return Number(node.widgets?.find((w) => w.name === "radius")?.value);
}

function refresh(node) {
  const panel = node.shieldedPanel;
  if (!panel) return;
  const radius = radiusOf(node);
  const calibration = calibrationState.last;
  const elements = panel.elements || calibration?.elements || 0;
  panel.l2.textContent = radiusLine(radius, elements);
  panel.calibration.textContent = calibrationLine(radius, calibration);
  const scale = sizedContext(panel.scale, 12);
  drawScale(scale.ctx, scale.width, 12, radius, calibration?.median);
  if (panel.activity) {
    panel.chart.style.display = "block";
    const chart = sizedContext(panel.chart, CHART_HEIGHT);
    panel.chartInfo = drawActivity(chart.ctx, chart.width, CHART_HEIGHT, panel.activity);
  }
}

function growToFit(node) {
  const needed = node.computeSize();
  if (needed[1] > node.size[1]) node.setSize([node.size[0], needed[1]]);
  node.setDirtyCanvas?.(true, true);
}

function scheduleRequeue(node) {
  const panel = node.shieldedPanel;
  if (!panel?.checkbox.checked) return;
  clearTimeout(panel.timer);
  panel.timer = setTimeout(function fire() {
    if (!node.shieldedPanel) return;
    if (pointerDown) {
      panel.timer = setTimeout(fire, REQUEUE_DELAY_MS);
      return;
    }
    panel.timer = null;
    app.queuePrompt(0, 1);
  }, REQUEUE_DELAY_MS);
}

function watchRadius(node) {
  const widget = node.widgets?.find((w) => w.name === "radius");
  if (!widget) return;
  chain(widget, "callback", () => {
    refresh(node);
    scheduleRequeue(node);
  });
}

function attachPanel(node) {
  const panel = buildPanel();
  node.shieldedPanel = panel;
  node.properties = node.properties || {};
  panel.checkbox.checked = Boolean(node.properties[REQUEUE_PROPERTY]);
  panel.checkbox.addEventListener("change", () => {
    node.properties[REQUEUE_PROPERTY] = panel.checkbox.checked;
  });
  const widget = node.addDOMWidget(PANEL_WIDGET, "shielded_panel", panel.root,
    { serialize: false, hideOnZoom: false });
  widget.serialize = false;
  widget.computeLayoutSize = () => ({ minHeight: panelHeight(panel), minWidth: 220 });
  panel.widget = widget;
  watchRadius(node);
  livePanels.add(node);
  requestAnimationFrame(() => refresh(node));
}

function detachPanel(node) {
  const panel = node.shieldedPanel;
  if (!panel) return;
  clearTimeout(panel.timer);
  livePanels.delete(node);
  node.shieldedPanel = null;
}

function onSpellExecuted(message) {
  const activity = message?.spell_activity?.[0];
  const panel = this.shieldedPanel;
  if (!panel || !activity || !Array.isArray(activity.corrected)) return;
  panel.activity = activity;
  panel.elements = activity.elements;
  refresh(this);
  growToFit(this);
}

function onSpellConfigure() {
  const panel = this.shieldedPanel;
  if (!panel) return;
  panel.checkbox.checked = Boolean(this.properties?.[REQUEUE_PROPERTY]);
  requestAnimationFrame(() => {
    refresh(this);
    growToFit(this);
  });
}

function patchSpellNode(nodeType) {
  chain(nodeType.prototype, "onNodeCreated", function created() { attachPanel(this); });
  chain(nodeType.prototype, "onExecuted", onSpellExecuted);
  chain(nodeType.prototype, "onConfigure", onSpellConfigure);
  chain(nodeType.prototype, "onRemoved", function removed() { detachPanel(this); });
}

function patchCalibrationNode(nodeType) {
  chain(nodeType.prototype, "onNodeCreated", function created() {
    const box = el("div", "shielded-calibration-result", TOOLTIPS.calibrationResult,
      { font: "11px sans-serif", color: "var(--input-text, #ddd)", padding: "2px 4px", whiteSpace: "normal" });
    box.textContent = "median: not measured yet";
    const widget = this.addDOMWidget(CALIBRATION_WIDGET, "shielded_text", box, { serialize: false });
    widget.serialize = false;
    widget.computeLayoutSize = () => ({ minHeight: 4 * LINE, minWidth: 200 });
    this.shieldedCalibrationBox = box;
  });
  chain(nodeType.prototype, "onExecuted", function executed(message) {
    const info = message?.spell_calibration?.[0];
    if (!info) return;
    calibrationState.last = info;
    if (this.shieldedCalibrationBox) this.shieldedCalibrationBox.textContent = message.text?.[0] ?? "";
    livePanels.forEach(refresh);
  });
  chain(nodeType.prototype, "onRemoved", function removed() { this.shieldedCalibrationBox = null; });
}

app.registerExtension({
  name: EXTENSION,
  setup() {
    window.addEventListener("pointerdown", () => { pointerDown = true; }, true);
    window.addEventListener("pointerup", () => { pointerDown = false; }, true);
    window.addEventListener("pointercancel", () => { pointerDown = false; }, true);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (SPELL_NODES.has(nodeData.name)) patchSpellNode(nodeType);
    else if (nodeData.name === CALIBRATION_NODE) patchCalibrationNode(nodeType);
  },
});
