// The chat page in a real browser against the real server: two users chat,
// message data is only ever text, the CSP holds, and other origins cannot
// open a socket.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { createServer } from "node:http";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { chatUrl, launch, until, openUser, screenshot, sendText, shownMessages, waitForBody, waitLive } from "./lib/browser.mjs";
import { TestServer } from "./lib/server.mjs";
import { rawConnect } from "./lib/wsclient.mjs";

const CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
  "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

describe("the chat page", { timeout: 90_000 }, () => {
  let server;
  let browser;
  let alice;
  let bob;

  before(async () => {
    // Tokens of a minute or two are warned about at once; the users' own
    // tokens (an hour) are not.
    server = await TestServer.create({ extraConfig: "[session]\nexpiry_warning_secs = 90\n" });
    browser = await launch();
    const [aliceToken, bobToken] = await Promise.all([
      server.token("alice", "Alice", { roles: ["admin"] }),
      server.token("bob", "Bob"),
    ]);
    alice = await openUser(browser, chatUrl(server.origin, aliceToken));
    bob = await openUser(browser, chatUrl(server.origin, bobToken));
    await Promise.all([waitLive(alice.page), waitLive(bob.page)]);
  });

  after(async () => {
    await browser?.close();
    await server?.dispose();
  });

  test("is served with a strict Content-Security-Policy and keeps the token out of the address", async () => {
    const headers = alice.response.headers();
    assert.equal(headers["content-security-policy"], CSP);
    assert.equal(headers["x-content-type-options"], "nosniff");
    assert.equal(headers["x-frame-options"], "DENY");
    assert.equal(headers["referrer-policy"], "no-referrer");
    for (const path of ["/app.js", "/securechat.js", "/style.css"]) {
      const response = await alice.page.request.get(`${server.origin}${path}`);
      assert.equal(response.status(), 200, path);
      assert.equal(response.headers()["content-security-policy"], CSP, path);
    }
    // The fragment never reaches the server; the page also removes it from
    // the address bar and history.
    assert.equal(new URL(alice.page.url()).hash, "");
    assert.ok(!alice.record.requests.some((url) => url.includes("token=")), "no request carries the token in its URL");
  });

  test("shows the signed-in user and the connection state", async () => {
    assert.equal(await alice.page.textContent("#identity"), "Alice (alice)");
    assert.equal(await bob.page.textContent("#status-text"), "Live");
    // The page joined `general` by itself.
    await alice.page.locator('.room-button[data-room="general"][aria-current="true"]').waitFor();
  });

  test("two users chat: messages arrive in order with the right names", async () => {
    const script = [
      [alice, "Hello Bob"],
      [bob, "Hi Alice!"],
      [alice, "Line one\nline two"],
      [bob, "Tabs\tand   spaces stay"],
      [alice, "Last one"],
    ];
    for (const [user, text] of script) await sendText(user.page, "general", text);
    await waitForBody(bob.page, "general", "Last one");
    const expected = script.map(([user, text]) => ({ sender: user === alice ? "Alice" : "Bob", body: text }));
    for (const user of [alice, bob]) {
      const shown = await shownMessages(user.page, "general");
      assert.deepEqual(
        shown.map(({ sender, body }) => ({ sender, body })),
        expected,
      );
      const seqs = shown.map((m) => m.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "in seq order");
      assert.equal(new Set(seqs).size, seqs.length, "each once");
    }
    // Sender and time are shown; own messages are marked.
    const first = alice.page.locator(".message-list[data-room=general] .message").first();
    assert.match(await first.locator("time").getAttribute("datetime"), /^\d{4}-\d\d-\d\dT/);
    assert.ok(await first.evaluate((li) => li.classList.contains("own")));
    await screenshot(alice.page, "chat.png");
  });

  test("message data is text: an XSS payload is shown literally and no script runs", async () => {
    const payloads = [
      "<img src=x onerror=alert(1)>",
      '<script>window.__xss = "script"</script>',
      '<svg onload="window.__xss = \'svg\'"></svg>',
      '"><iframe src="javascript:alert(2)"></iframe>',
    ];
    for (const payload of payloads) await sendText(bob.page, "general", payload);
    for (const payload of payloads) await waitForBody(alice.page, "general", payload);
    for (const user of [alice, bob]) {
      const bodies = (await shownMessages(user.page, "general")).map((m) => m.body);
      for (const payload of payloads) assert.ok(bodies.includes(payload), `shown literally: ${payload}`);
      const injected = await user.page.$$eval("#messages img, #messages script, #messages svg, #messages iframe", (e) => e.length);
      assert.equal(injected, 0, "no element was created from message data");
      assert.equal(await user.page.evaluate(() => window.__xss), undefined);
      assert.deepEqual(user.record.dialogs, [], "no alert() ran");
      assert.ok(!user.record.requests.some((url) => new URL(url).pathname === "/x"), "the <img> was never loaded");
      assert.deepEqual(user.record.pageErrors, []);
    }
    // The server's name for the sender is shown, however the message looks.
    const last = (await shownMessages(alice.page, "general")).at(-1);
    assert.equal(last.sender, "Bob");
  });

  test("authors delete their own messages; a moderator deletes anyone's", async () => {
    await sendText(bob.page, "general", "bob regrets this");
    await waitForBody(alice.page, "general", "bob regrets this");
    const bobsMessage = bob.page.locator(".message-list[data-room=general] .message", { hasText: "bob regrets this" });
    await bobsMessage.locator("button.delete").click();
    await waitForBody(alice.page, "general", "This message was deleted.");

    // Bob is no moderator: no delete button on Alice's messages.
    const alicesOnBob = bob.page.locator(".message-list[data-room=general] .message", { hasText: "Last one" });
    assert.equal(await alicesOnBob.locator("button.delete").count(), 0);
    // Alice is an admin: she may delete Bob's.
    const bobsOnAlice = alice.page.locator(".message-list[data-room=general] .message", { hasText: "Hi Alice!" });
    await bobsOnAlice.locator("button.delete").click();
    await bob.page.waitForFunction(() => {
      const bodies = [...document.querySelectorAll(".message-list[data-room=general] .message .body")].map((e) => e.textContent);
      return !bodies.includes("Hi Alice!") && bodies.includes("This message was deleted.") && bodies.includes("You deleted this message.");
    });
    // Alice's page learns of her deletion from the same broadcast, in its
    // own time: wait for it rather than read her page at once.
    await alice.page.waitForFunction(() => {
      const bodies = [...document.querySelectorAll(".message-list[data-room=general] .message .body")].map((e) => e.textContent);
      return !bodies.includes("Hi Alice!") && !bodies.includes("bob regrets this");
    });
    const remaining = (await shownMessages(alice.page, "general")).map((m) => m.body);
    assert.ok(!remaining.includes("Hi Alice!") && !remaining.includes("bob regrets this"));
  });

  test("a session about to end: the page says so, and a pasted token renews it without reconnecting", async () => {
    const carol = await openUser(browser, chatUrl(server.origin, await server.token("carol", "Carol", { ttl: "60s" })));
    await waitLive(carol.page);
    await carol.page.locator("#notice", { hasText: "Your session ends at" }).waitFor();
    await carol.page.fill("#renew-token", await server.token("carol", "Carol", { ttl: "1h" }));
    await carol.page.click("#renew-form button[type=submit]");
    await carol.page.locator("#notice").waitFor({ state: "hidden" });
    const frames = carol.record.frames.map((f) => JSON.parse(f.text).type);
    assert.ok(frames.includes("refresh") && frames.includes("refreshed"), frames.join(","));
    assert.equal(frames.filter((t) => t === "welcome").length, 1, "the same connection went on");
    assert.equal(await carol.page.textContent("#status-text"), "Live");
    await carol.context.close();
  });

  test("no CSP violation and no dropped frame on either page", async () => {
    for (const user of [alice, bob]) {
      assert.deepEqual(await user.page.evaluate(() => window.__cspViolations), []);
      assert.ok(!user.record.console.some((line) => line.includes("Content Security Policy")), user.record.console.join("\n"));
      assert.equal(await user.page.evaluate(() => document.body.dataset.invalidFrames), undefined);
    }
  });

  test("a page from a foreign origin cannot open a socket (403); the server's own origin can", async () => {
    const foreignHtml = await readFile(new URL("./lib/foreign.html", import.meta.url));
    const foreign = createServer((req, res) => {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
      res.end(foreignHtml);
    });
    await new Promise((done) => foreign.listen(0, "127.0.0.1", done));
    const foreignOrigin = `http://127.0.0.1:${foreign.address().port}`;
    const token = await server.token("mallory", "Mallory");
    try {
      const params = new URLSearchParams({ token, target: server.wsUrl });
      const evil = await openUser(browser, `${foreignOrigin}/#${params}`);
      await evil.page.waitForFunction(() => document.getElementById("out").textContent !== "pending");
      const outcome = await evil.page.textContent("#out");
      assert.match(outcome, /^refused/, outcome);
      await until(() => evil.record.wsErrors.length > 0);
      assert.ok(evil.record.wsErrors.some((e) => e.includes("403")), `the browser saw 403: ${evil.record.wsErrors}`);
      await evil.context.close();

      // The same handshake outside a browser, to read the refusal itself.
      const ca = await readFile(join(server.dir, "certs", "ca.crt"));
      const refused = await rawConnect({ port: server.port, ca, token, origin: foreignOrigin });
      assert.equal(refused.status, 403);
      assert.equal(JSON.parse(refused.body).error, "origin_not_allowed");
      const accepted = await rawConnect({ port: server.port, ca, token, origin: server.origin });
      assert.ok(accepted.texts !== undefined, `the own origin is accepted: ${accepted.status}`);
      await accepted.next((f) => f.type === "welcome");
      accepted.close();
    } finally {
      await new Promise((done) => foreign.close(done));
    }

    // From the server's own page, the same socket opens.
    const opened = await alice.page.evaluate(
      ([url, t]) =>
        new Promise((done) => {
          const ws = new WebSocket(url, ["securechat.v1", `securechat.bearer.${t}`]);
          ws.onopen = () => {
            ws.close();
            done("open");
          };
          ws.onclose = (e) => done(`closed ${e.code}`);
        }),
      [server.wsUrl, token],
    );
    assert.equal(opened, "open");
  });
});
