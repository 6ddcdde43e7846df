// Headless Chromium (Debian's /usr/bin/chromium, never a downloaded browser) on a running ComfyUI.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];

/** Launches Chromium headless with a throw-away profile; returns { context, page, log, close }. */
export async function openComfy(url, { blockExtension = false } = {}) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "shielded-ui-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1400, height: 900 },
  });
  const page = context.pages()[0] || await context.newPage();
  const log = [];
  page.on("console", (m) => { if (m.type() === "error") log.push({ kind: "console", text: m.text(), url: m.location()?.url }); });
  page.on("pageerror", (e) => log.push({ kind: "pageerror", text: e.message, stack: e.stack || "" }));
  page.on("response", (r) => { if (r.status() >= 400) log.push({ kind: "http", text: `${r.status()}`, url: r.url() }); });
  if (blockExtension) {
    await page.route("**/extensions/comfyui-shielded-sampling/**", (route) =>
      route.fulfill({ status: 200, contentType: "text/javascript", body: "export {};" }));
  }
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.LiteGraph, null, { timeout: 90000 });
  await page.waitForTimeout(3000);
  const close = async () => {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return { context, page, log, close };
}

/** Closes dialogs the host may open on first start (templates browser, release notes). */
export async function dismissDialogs(page) {
  for (let i = 0; i < 3; i += 1) {
    const dialog = page.locator(".p-dialog").first();
    if (!(await dialog.isVisible().catch(() => false))) return;
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}
