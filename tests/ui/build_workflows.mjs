// Builds example_workflows/*.json from workflow_specs.mjs inside a real ComfyUI front end.
// Usage: node build_workflows.mjs http://127.0.0.1:PORT/ ../../example_workflows [spec-file-name ...]
import fs from "node:fs";
import path from "node:path";
import { openComfy } from "./browser.mjs";
import { SPECS } from "./workflow_specs.mjs";

/** Runs in the page: creates the nodes and links of a spec, returns the serialized workflow. */
function buildInPage(spec) {
  const { app } = window.comfyAPI.app;
  const { LiteGraph } = window;
  app.graph.clear();
  const made = {};
  const problems = [];
  for (const [key, def] of Object.entries(spec.nodes)) {
    const node = LiteGraph.createNode(def.type);
    if (!node) { problems.push(`unknown node type ${def.type}`); continue; }
    app.graph.add(node);
    node.pos = def.pos;
    if (def.title) node.title = def.title;
    for (const [name, value] of Object.entries(def.widgets || {})) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) problems.push(`${def.type} has no widget ${name}`);
      else widget.value = value;
    }
    if (def.size) node.setSize(def.size);
    else node.setSize(node.computeSize());
    made[key] = node;
  }
  for (const [from, output, to, input] of spec.links) {
    const a = made[from]; const b = made[to];
    const out = a?.outputs?.findIndex((o) => o.name === output);
    const inp = b?.inputs?.findIndex((i) => i.name === input);
    if (!a || !b || out < 0 || inp < 0) { problems.push(`cannot link ${from}.${output} -> ${to}.${input}`); continue; }
    a.connect(out, b, inp);
  }
  app.graph.setDirtyCanvas(true, true);
  return { workflow: app.graph.serialize(), problems };
}

async function main() {
  const [url, outDir, ...only] = process.argv.slice(2);
  const session = await openComfy(url);
  let failed = false;
  try {
    for (const spec of SPECS.filter((s) => only.length === 0 || only.includes(s.file))) {
      const { workflow, problems } = await session.page.evaluate(buildInPage, spec);
      if (problems.length) {
        failed = true;
        process.stderr.write(`${spec.file}: ${problems.join("; ")}\n`);
        continue;
      }
      fs.writeFileSync(path.join(outDir, `${spec.file}.json`), `${JSON.stringify(workflow, null, 2)}\n`);
      process.stdout.write(`wrote ${spec.file}.json (${workflow.nodes.length} nodes, ${workflow.links.length} links)\n`);
    }
  } finally {
    await session.close();
  }
  process.exit(failed ? 1 : 0);
}

main();
