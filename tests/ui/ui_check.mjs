// UI checks of the pack in headless Chromium against a running ComfyUI that has the pack installed.
// Usage: node ui_check.mjs URL ARTIFACT_DIR TINY_MODELS_JSON [RENDERER] > result.json
// TINY_MODELS_JSON: {"checkpoint": file, "files": {real file name: tiny file name}, "text_encoder_type": type}.
// Writes one JSON object with what it observed; tests/integration/test_ui_browser.py asserts on it.
// Screenshots go to ARTIFACT_DIR.
import fs from "node:fs";
import path from "node:path";
import { dismissDialogs, openComfy } from "./browser.mjs";
import { TOOLTIPS } from "../../web/spell_panel.js";

const PACK = "comfyui-shielded-sampling";
const [url, artifacts, tinyJson, renderer = "classic"] = process.argv.slice(2);
const tinyModels = JSON.parse(tinyJson);
const result = { errors: {}, search: {}, workflows: {}, widgets: {}, run: {}, requeue: {}, calibration: {} };

const shot = async (page, name, clip) => {
  const file = path.join(artifacts, `${name}.png`);
  await page.screenshot({ path: file, clip });
  return file;
};

/** One line per error; the host's own noise (favicon, resources off this offline machine) gets one label each. */
function normalise(entry) {
  if (/favicon\.ico/.test(entry.url || "") || /favicon\.ico/.test(entry.text || "")) return "host: favicon";
  const offsite = entry.url && !entry.url.startsWith(new URL(url).origin);
  if (offsite || /ERR_NAME_NOT_RESOLVED|ERR_INTERNET_DISCONNECTED/.test(entry.text || "")) return "host: offline";
  return `${entry.kind}: ${(entry.text || "").replace(/:\d+:\d+/g, "")} ${entry.url || ""}`.trim();
}

async function checkLoadErrors() {
  const baseline = await openComfy(url, { blockExtension: true });
  const baseErrors = new Set(baseline.log.map(normalise));
  await baseline.close();
  const session = await openComfy(url);
  await dismissDialogs(session.page);
  const errors = session.log.map(normalise);
  result.errors.baseline = [...baseErrors];
  result.errors.with_extension = errors;
  result.errors.only_with_extension = errors.filter((e) => !baseErrors.has(e));
  result.errors.mentioning_pack = session.log.filter((e) => JSON.stringify(e).includes(PACK)).map(normalise);
  result.errors.extension_loaded = await session.page.evaluate(
    () => window.comfyAPI.app.app.extensions?.some((e) => e.name === "shielded_sampling.spell_panel"));
  await shot(session.page, "01_loaded");
  return session;
}

/** Opens the node search box through the front end's command API (the double click is not what is tested). */
async function openSearch(page) {
  const input = page.locator("input[placeholder*='Add a node'], .comfy-vue-node-search-container input, " +
    "input[placeholder*='Search']").first();
  for (let attempt = 0; attempt < 3; attempt += 1) {
    await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute("Workspace.SearchBox.Toggle"));
    try {
      await input.waitFor({ state: "visible", timeout: 4000 });
      return input;
    } catch {
      await page.keyboard.press("Escape");
      await page.waitForTimeout(500);
    }
  }
  throw new Error("the node search box did not open (command Workspace.SearchBox.Toggle)");
}

async function searchNode(page, displayName) {
  const input = await openSearch(page);
  await input.fill(displayName);
  await page.waitForTimeout(700);
  const options = await page.locator(".p-autocomplete-option, [role='option']").allInnerTexts();
  return { options: options.slice(0, 8), input };
}

async function checkSearch(page, displayNames) {
  await page.evaluate(() => window.comfyAPI.app.app.graph.clear());
  for (const [i, name] of displayNames.entries()) {
    const { options } = await searchNode(page, name);
    result.search[name] = options;
    if (i === 0) await shot(page, "02_node_search");
    await page.keyboard.press("Escape");
    await page.waitForTimeout(600);
  }
}

/** Runs in the page: loads a workflow and reports missing node types and dialogs. */
async function loadInPage(workflow) {
  const { app } = window.comfyAPI.app;
  await app.loadGraphData(workflow, true, true, null);
  await new Promise((r) => setTimeout(r, 800));
  const nodes = app.graph.nodes || app.graph._nodes;
  const missing = nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type);
  const dialogs = [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText.slice(0, 300));
  return { nodes: nodes.length, missing, dialogs, types: nodes.map((n) => n.type) };
}

/** Runs in the page: shrinks the loaded workflow to the tiny models, 64 px, a few frames and a few steps.
 * Model files named by the workflow are swapped for their tiny stand-ins; T5 text encoders cannot be tiny in
 * ComfyUI (fixed 4096x24 config), so the loaders read a CLIP-L as type `text_encoder_type` (see make_tiny_models.py). */
function shrinkInPage({ checkpoint, files, text_encoder_type: textEncoderType }) {
  const { app } = window.comfyAPI.app;
  const widget = (node, name) => node.widgets?.find((x) => x.name === name);
  const set = (node, name, value) => {
    const w = widget(node, name);
    if (w) w.value = value;
  };
  const cap = (node, name, most) => {
    const w = widget(node, name);
    if (w) w.value = Math.min(w.value, most);
  };
  const latentNodes = ["EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo", "ShieldSetLoader"];
  for (const node of app.graph.nodes || app.graph._nodes) {
    set(node, "ckpt_name", checkpoint);
    for (const name of ["unet_name", "vae_name", "clip_name", "clip_name1", "clip_name2"]) {
      const w = widget(node, name);
      if (w && files[w.value]) w.value = files[w.value];
    }
    if (node.type === "CLIPLoader" || node.type === "DualCLIPLoader") set(node, "type", textEncoderType);
    if (latentNodes.includes(node.type)) {
      set(node, "width", 64); set(node, "height", 64);
      cap(node, "batch_size", 3);
      cap(node, "length", 1);   // one latent frame: the video latent stays 5-D; WAN's full-size VAE is slow on a CPU
    }
    set(node, "steps", 3);
  }
}

/** Runs in the page: queues through the front end and waits for the prompt to finish. */
async function queueInPage(timeoutMs) {
  const { app } = window.comfyAPI.app;
  const { api } = window.comfyAPI.api;
  const done = new Promise((resolve) => {
    const finish = (kind) => (e) => resolve({ kind, detail: JSON.stringify(e.detail ?? {}).slice(0, 2000) });
    api.addEventListener("execution_success", finish("success"));
    api.addEventListener("execution_error", finish("error"));
    setTimeout(() => resolve({ kind: "timeout" }), timeoutMs);
  });
  const p = await app.graphToPrompt();
  const res = await api.queuePrompt(0, p).catch((e) => ({ error: String(e.message || e), response: e.response }));
  if (res.error) return { kind: "rejected", detail: JSON.stringify(res).slice(0, 2000) };
  return done;
}

async function checkWorkflows(page) {
  const listing = await page.evaluate(async () => (await fetch("/api/workflow_templates")).json());
  const names = listing[PACK] || [];
  result.workflows_listed = names;
  for (const name of names) {
    const workflow = await page.evaluate(
      async (n) => (await fetch(`/api/workflow_templates/comfyui-shielded-sampling/${n}.json`)).json(), name);
    const loaded = await page.evaluate(loadInPage, workflow);
    await page.evaluate(() => window.comfyAPI.app.app.canvas.ds.reset?.());
    await page.evaluate(() => window.comfyAPI.app.app.graph.setDirtyCanvas(true, true));
    await page.waitForTimeout(500);
    await shot(page, `03_workflow_${name}`);
    await page.evaluate(shrinkInPage, tinyModels);
    const run = await page.evaluate(queueInPage, 240000);
    await page.evaluate(fitViewInPage);
    await page.waitForTimeout(1500);
    await shot(page, `04_after_run_${name}`);
    result.workflows[name] = { ...loaded, run };
    if (name === "spell_radius_calibration") result.calibration = await calibrationView(page);
  }
}

/** Runs in the page: zooms so every node is on screen. */
function fitViewInPage() {
  const { app } = window.comfyAPI.app;
  const nodes = app.graph.nodes || app.graph._nodes;
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 20;
  const y0 = Math.min(...nodes.map((n) => n.pos[1] - title)) - 20;
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
  const r = app.canvas.canvas.getBoundingClientRect();
  const scale = Math.min(1, (r.width - 60) / (x1 - x0), (r.height - 100) / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [30 / scale - x0, 60 / scale - y0];
  app.graph.setDirtyCanvas(true, true);
}

async function calibrationView(page) {
  return page.evaluate(() => {
    const box = document.querySelector(".shielded-calibration-result");
    return { text: box?.innerText || "", title: box?.title || "" };
  });
}

/** Runs in the page: screen rectangle of the first node of a type (canvas coordinates -> CSS pixels). */
function nodeRectInPage(type) {
  const { app } = window.comfyAPI.app;
  const node = (app.graph.nodes || app.graph._nodes).find((n) => n.type === type);
  if (!node) return null;
  const { scale, offset } = app.canvas.ds;
  const r = app.canvas.canvas.getBoundingClientRect();
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  return { x: r.left + (node.pos[0] + offset[0]) * scale - 4, y: r.top + (node.pos[1] - title + offset[1]) * scale - 4,
    width: node.size[0] * scale + 8, height: (node.size[1] + title) * scale + 8 };
}

async function focusNode(page, type) {
  await page.evaluate((t) => {
    const { app } = window.comfyAPI.app;
    const node = (app.graph.nodes || app.graph._nodes).find((n) => n.type === t);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [80 - node.pos[0], 120 - node.pos[1]];
    app.graph.setDirtyCanvas(true, true);
  }, type);
  await page.waitForTimeout(600);
  return page.evaluate(nodeRectInPage, type);
}

async function checkWidgets(page) {
  const rect = await focusNode(page, "ShieldedSpellSampler");
  const view = await page.evaluate(() => {
    const pick = (sel) => {
      const el = document.querySelector(sel);
      if (!el) return null;
      const b = el.getBoundingClientRect();
      return { title: el.title, text: el.innerText || "", visible: b.width > 0 && b.height > 0 && getComputedStyle(el).display !== "none" };
    };
    return { l2: pick(".shielded-radius-l2"), scale: pick(".shielded-radius-scale"),
      calibration: pick(".shielded-calibration"), requeue: pick(".shielded-requeue"),
      toggle: pick(".shielded-requeue-toggle"), activity: pick(".shielded-activity"),
      toggleChecked: document.querySelector(".shielded-requeue-toggle")?.checked,
      markerPixels: (() => {
        const c = document.querySelector(".shielded-radius-scale");
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - 230) < 12 && Math.abs(d[i + 1] - 120) < 12 && Math.abs(d[i + 2] - 30) < 12) n += 1;
        return n;
      })() };
  });
  result.widgets = { ...view, expected: TOOLTIPS };
  result.widgets.radius_tooltip = await hoverRadiusTooltip(page);
  await shot(page, "04_spell_sampler_widgets", clipOf(rect));
}

/** Runs in the page: where the radius widget is on screen, in either renderer. */
function radiusWidgetPointInPage() {
  const { app } = window.comfyAPI.app;
  const node = (app.graph.nodes || app.graph._nodes).find((n) => n.type === "ShieldedSpellSampler");
  const element = document.querySelector(`[data-node-id="${node.id}"]`);
  if (element) {   // Nodes 2.0: widgets are DOM rows; hover the row's label
    const row = [...element.querySelectorAll(".lg-node-widget")].find((e) => e.innerText.trim() === "radius");
    const b = row.getBoundingClientRect();
    return { x: b.left + 30, y: b.top + b.height / 2, tooltip: ".p-tooltip" };
  }
  const w = node.widgets.find((x) => x.name === "radius");
  const { scale, offset } = app.canvas.ds;
  const r = app.canvas.canvas.getBoundingClientRect();
  return { x: r.left + (node.pos[0] + node.size[0] / 2 + offset[0]) * scale,
    y: r.top + (node.pos[1] + w.y + 10 + offset[1]) * scale, tooltip: ".node-tooltip" };
}

async function hoverRadiusTooltip(page) {
  const pos = await page.evaluate(radiusWidgetPointInPage);
  await page.mouse.move(pos.x - 5, pos.y);
  await page.mouse.move(pos.x, pos.y);
  const tip = page.locator(pos.tooltip).filter({ hasText: /\S/ }).first();
  try {
    await tip.waitFor({ state: "visible", timeout: 5000 });
    const text = await tip.innerText();
    await shot(page, "05_radius_tooltip");
    return text;
  } catch {
    return "";
  }
}

const clipOf = (rect) => ({ x: Math.max(0, rect.x), y: Math.max(0, rect.y), width: Math.min(1400, rect.width),
  height: Math.min(900, rect.height) });

async function checkRun(page) {
  const workflow = await page.evaluate(async () =>
    (await fetch("/api/workflow_templates/comfyui-shielded-sampling/spell_diverse_batch_with_history.json")).json());
  await page.evaluate(loadInPage, workflow);
  await page.evaluate(shrinkInPage, tinyModels);
  result.run.queue = await page.evaluate(queueInPage, 300000);
  await page.waitForTimeout(800);
  const rect = await focusNode(page, "ShieldedSpellSampler");
  result.run.panel = await page.evaluate(() => {
    const { app } = window.comfyAPI.app;
    const node = (app.graph.nodes || app.graph._nodes).find((n) => n.type === "ShieldedSpellSampler");
    const canvas = document.querySelector(".shielded-activity");
    const b = canvas.getBoundingClientRect();
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let bar = 0; let line = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (Math.abs(data[i] - 70) < 12 && Math.abs(data[i + 1] - 130) < 12 && Math.abs(data[i + 2] - 180) < 12) bar += 1;
      if (Math.abs(data[i] - 230) < 12 && Math.abs(data[i + 1] - 120) < 12 && Math.abs(data[i + 2] - 30) < 12) line += 1;
    }
    return { activity: node.shieldedPanel?.activity ?? null, chartInfo: node.shieldedPanel?.chartInfo ?? null,
      visible: b.width > 0 && b.height > 0 && getComputedStyle(canvas).display !== "none",
      barPixels: bar, linePixels: line, l2: document.querySelector(".shielded-radius-l2")?.innerText };
  });
  await shot(page, "06_activity_chart_after_run", clipOf(rect));
  const report = await focusNode(page, "ShieldedSpellReport");
  result.run.report_images = await page.evaluate(() => {
    const { app } = window.comfyAPI.app;
    const node = (app.graph.nodes || app.graph._nodes).find((n) => n.type === "ShieldedSpellReport");
    const element = document.querySelector(`[data-node-id="${node.id}"]`);   // Nodes 2.0 shows them in the DOM
    const images = node.imgs?.length ? node.imgs : [...(element?.querySelectorAll("img") || [])];
    return images.map((i) => ({ w: i.naturalWidth, h: i.naturalHeight }));
  });
  await shot(page, "07_spell_report_node", clipOf(report));
}

/** Re-queue on release: off by default, one queue per burst of slider changes, none after node removal. */
async function checkRequeue(page) {
  result.requeue = await page.evaluate(async () => {
    const { app } = window.comfyAPI.app;
    const calls = [];
    const original = app.queuePrompt;
    app.queuePrompt = (...a) => { calls.push(a); return Promise.resolve(); };
    const wait = (ms) => new Promise((r) => setTimeout(r, ms));
    const node = () => (app.graph.nodes || app.graph._nodes).find((n) => n.type === "ShieldedSpellSampler");
    const slide = (values) => values.forEach((v) => {
      const w = node().widgets.find((x) => x.name === "radius");
      w.value = v; w.callback?.(v);
    });
    const out = {};
    slide([0.2, 0.21, 0.22]); await wait(1200); out.off = calls.length;
    const box = document.querySelector(".shielded-requeue-toggle");
    box.click();
    out.property = node().properties.shielded_requeue_on_release;
    slide([0.23, 0.24, 0.25]); await wait(300); out.during = calls.length; await wait(1200); out.after = calls.length;
    slide([0.3]); app.graph.remove(node()); await wait(1300); out.after_removal = calls.length;
    out.panels_left = document.querySelectorAll(".shielded-spell-panel").length;
    app.queuePrompt = original;
    return out;
  });
}

async function main() {
  fs.mkdirSync(artifacts, { recursive: true });
  const session = await checkLoadErrors();
  const { page } = session;
  try {
    result.renderer = await page.evaluate((requested) => ({ requested,
      vueNodes: Boolean(window.comfyAPI.app.app.extensionManager.setting.get("Comfy.VueNodes.Enabled")),
      frontEnd: window.__COMFYUI_FRONTEND_VERSION__ ?? null }), renderer);
    const info = await page.evaluate(async () => (await fetch("/object_info")).json());
    const ours = Object.values(info).filter((d) => String(d.python_module).includes("shielded"));
    result.pack_nodes = ours.map((d) => d.display_name);
    await checkSearch(page, result.pack_nodes);
    await checkWorkflows(page);
    await checkRun(page);
    await checkWidgets(page);
    await checkRequeue(page);
    result.errors.after_all = session.log.map(normalise).filter((e) => !result.errors.baseline.includes(e));
  } catch (err) {
    result.crash = String(err.stack || err);
    await shot(page, "99_crash").catch(() => {});
  } finally {
    await session.close();
  }
  process.stdout.write(JSON.stringify(result, null, 1));
}

main();
