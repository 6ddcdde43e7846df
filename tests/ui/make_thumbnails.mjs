// Thumbnails of the example workflows, rendered by the real ComfyUI front end in headless Chromium.
// Usage: node make_thumbnails.mjs URL PACK_FOLDER [workflow-name ...]   (a running ComfyUI with this pack in
// custom_nodes/PACK_FOLDER; empty files under the model names the workflows use, e.g.
// models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors, avoid the missing-model highlight; input/example.png
// gives the inpainting workflow's Load Image its preview). Without names: every workflow.
// Writes example_workflows/<name>.jpg beside each <name>.json (the template browser shows it) and prints one JSON
// object: per workflow the node count and missing node types, and per node class whether its help page
// (/extensions/PACK_FOLDER/docs/<NodeClass>.md, where the front end looks) is served.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { dismissDialogs, openComfy } from "./browser.mjs";

const [url, packFolder, ...only] = process.argv.slice(2);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const workflowsDir = path.join(root, "example_workflows");
const WIDTH = 1200;
const HEIGHT = 800;
const result = { workflows: {}, help: {} };

/** Runs in the page: loads a workflow, fits it into the view, reports missing node types. */
async function loadAndFit(workflow) {
  const { app } = window.comfyAPI.app;
  await app.loadGraphData(workflow, true, true, null);
  await new Promise((r) => setTimeout(r, 800));
  const nodes = app.graph.nodes || app.graph._nodes;
  const canvas = app.canvas;
  canvas.show_info = false;                          // no FPS / node-count overlay
  // Draw titles and widgets even when zoomed out (newer front ends: level of detail by font size; older: zoom).
  if ("min_font_size_for_lod" in canvas) canvas.min_font_size_for_lod = 0;
  canvas.low_quality_zoom_threshold = 0;
  const box = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of nodes) {
    box[0] = Math.min(box[0], n.pos[0]); box[1] = Math.min(box[1], n.pos[1] - 30);
    box[2] = Math.max(box[2], n.pos[0] + n.size[0]); box[3] = Math.max(box[3], n.pos[1] + n.size[1]);
  }
  const [w, h] = [box[2] - box[0], box[3] - box[1]];
  const el = canvas.canvas;
  const scale = Math.min(el.clientWidth / w, el.clientHeight / h) * 0.92;
  canvas.ds.scale = scale;
  canvas.ds.offset[0] = -box[0] + (el.clientWidth / scale - w) / 2;
  canvas.ds.offset[1] = -box[1] + (el.clientHeight / scale - h) / 2;
  canvas.setDirty(true, true);
  await new Promise((r) => setTimeout(r, 600));
  return { nodes: nodes.length, missing: nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type) };
}

async function main() {
  const session = await openComfy(url);
  const { page } = session;
  await page.setViewportSize({ width: WIDTH, height: HEIGHT });
  await page.waitForFunction(() => Boolean(window.LiteGraph.registered_node_types.ShieldedSpellSampler), null,
    { timeout: 90000 });
  await page.waitForTimeout(4000);                    // the template browser opens itself on a first start
  await dismissDialogs(page);
  await page.keyboard.press("Escape");
  // Only the graph: hide menus, panels, dialogs and toasts; keep the canvas and the widgets drawn in DOM.
  await page.addStyleTag({ content: "body * { visibility: hidden !important; } "
    + "#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }" });
  const names = fs.readdirSync(workflowsDir).filter((f) => f.endsWith(".json")).map((f) => f.slice(0, -5)).sort()
    .filter((name) => only.length === 0 || only.includes(name));
  for (const name of names) {
    const workflow = JSON.parse(fs.readFileSync(path.join(workflowsDir, `${name}.json`), "utf8"));
    const info = await page.evaluate(loadAndFit, workflow);
    await dismissDialogs(page);
    await page.waitForTimeout(400);
    const canvas = await page.locator("#graph-canvas").boundingBox();
    const clip = canvas ? { x: canvas.x, y: canvas.y, width: Math.min(canvas.width, WIDTH), height: Math.min(canvas.height, HEIGHT) } : undefined;
    await page.screenshot({ path: path.join(workflowsDir, `${name}.jpg`), type: "jpeg", quality: 80, clip });
    result.workflows[name] = info;
  }
  const classes = await page.evaluate(async () => Object.keys(await (await fetch("/object_info")).json()));
  for (const cls of fs.readdirSync(path.join(root, "web", "docs")).filter((f) => f.endsWith(".md")).map((f) => f.slice(0, -3))) {
    result.help[cls] = await page.evaluate(async ([pack, c]) => {
      const r = await fetch(`/extensions/${pack}/docs/${c}.md`);
      return { status: r.status, startsWith: (await r.text()).slice(0, 40) };
    }, [packFolder, cls]);
    result.help[cls].registered = classes.includes(cls);
  }
  await session.close();
  process.stdout.write(JSON.stringify(result, null, 1));
}

main().catch((err) => { process.stderr.write(`${err.stack || err}\n`); process.exit(1); });
