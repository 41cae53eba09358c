// Headless Chromium (the system's, never a downloaded one) driven by
// playwright-core, one fresh context per user, recording what a test needs
// to check: dialogs, page errors, CSP violations, WebSocket frames.

import { existsSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";

import { chromium } from "playwright-core";

import { ARTIFACTS } from "./server.mjs";

export const CHROMIUM = process.env.SECURECHAT_CHROMIUM ?? "/usr/bin/chromium";

/** How long any single wait in the browser tests may take. */
export const WAIT_MS = 15_000;

export async function launch() {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium`);
  return chromium.launch({
    executablePath: CHROMIUM,
    timeout: 30_000,
    args: [
      "--headless=new",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/**
 * Opens `url` in a new context (a separate user: no shared cookies or
 * storage). The test server's certificate is from a test CA, hence
 * ignoreHTTPSErrors; connections go to 127.0.0.1 only.
 */
export async function openUser(browser, url) {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    viewport: { width: 1100, height: 720 },
    locale: "en-GB",
    timezoneId: "UTC",
    serviceWorkers: "block",
  });
  context.setDefaultTimeout(WAIT_MS);
  const page = await context.newPage();
  const record = { dialogs: [], pageErrors: [], console: [], frames: [], wsErrors: [], requests: [] };
  page.on("dialog", (dialog) => {
    record.dialogs.push(dialog.message());
    dialog.dismiss().catch(() => {});
  });
  page.on("pageerror", (error) => record.pageErrors.push(String(error)));
  page.on("console", (message) => record.console.push(`${message.type()}: ${message.text()}`));
  page.on("request", (request) => record.requests.push(request.url()));
  page.on("websocket", (ws) => {
    ws.on("framesent", (frame) => record.frames.push({ dir: "sent", url: ws.url(), text: String(frame.payload) }));
    ws.on("framereceived", (frame) => record.frames.push({ dir: "received", url: ws.url(), text: String(frame.payload) }));
    ws.on("socketerror", (error) => record.wsErrors.push(String(error)));
  });
  // Runs before the page's own scripts; the CSP does not apply to it.
  await page.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener("securitypolicyviolation", (e) => {
      window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
    });
  });
  const response = await page.goto(url);
  return { context, page, record, response };
}

/** The chat page of `server` for `token` (in the fragment), optionally via another origin. */
export function chatUrl(origin, token, join) {
  const params = new URLSearchParams({ token });
  if (join) params.set("join", join);
  return `${origin}/#${params}`;
}

export function waitLive(page) {
  return page.locator('#status[data-state="live"]').waitFor();
}

/** The messages shown in `room`: sender, body text, seq. */
export function shownMessages(page, room) {
  return page.$$eval(`.message-list[data-room="${room}"] .message`, (items) =>
    items.map((li) => ({
      sender: li.querySelector(".sender").textContent,
      body: li.querySelector(".body").textContent,
      seq: Number(li.dataset.seq),
    })),
  );
}

/** Waits until `room` shows a message whose body is exactly `body`. */
export async function waitForBody(page, room, body) {
  await page.waitForFunction(
    ([r, b]) => [...document.querySelectorAll(`.message-list[data-room="${r}"] .message .body`)].some((e) => e.textContent === b),
    [room, body],
    { timeout: WAIT_MS },
  );
}

/** Types `text` in the composer and sends it with Enter; waits for its echo. */
export async function sendText(page, room, text) {
  await page.locator("#composer-input:enabled").fill(text);
  await page.locator("#composer-input").press("Enter");
  await waitForBody(page, room, text);
}

/** Joins `room` with the sidebar form; with a passphrase, as an end-to-end room. */
export async function joinWithForm(page, room, passphrase) {
  await page.fill("#join-room", room);
  if (passphrase !== undefined) {
    await page.check("#join-e2e");
    await page.fill("#join-passphrase", passphrase);
  }
  await page.click("#join-form button[type=submit]");
  await page.locator(`.room-button[data-room="${room}"][aria-current="true"]`).waitFor();
  await page.locator("#composer-input:enabled").waitFor();
}

/** Waits until `condition()` holds, checking every 50 ms, for at most `ms`. */
export async function until(condition, ms = WAIT_MS) {
  const end = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > end) throw new Error(`condition not met within ${ms} ms: ${condition}`);
    await new Promise((done) => setTimeout(done, 50));
  }
}

export async function screenshot(page, name) {
  await mkdir(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, name);
  await page.screenshot({ path, fullPage: true });
  return path;
}
