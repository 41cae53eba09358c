// Reconnection in a real browser: a cut connection and a server restart.
// The page shows that it is reconnecting, comes back by itself, joins its
// rooms again with `since`, and shows what was sent meanwhile (or a gap
// marker when the server no longer has it).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { WAIT_MS, chatUrl, launch, openUser, screenshot, sendText, shownMessages, waitForBody, waitLive } from "./lib/browser.mjs";
import { startProxy } from "./lib/proxy.mjs";
import { TestServer } from "./lib/server.mjs";

// Reconnection waits are the backoff's (at most a few seconds here), plus
// the time to notice: give them more than the default wait.
const RECONNECT_MS = 25_000;

describe("reconnection", { timeout: 120_000 }, () => {
  let server;
  let proxy;
  let browser;
  let alice;
  let bob;

  before(async () => {
    // Alice reaches the server through a relay the test can cut; Bob
    // connects directly.
    proxy = await startProxy();
    server = await TestServer.create({ extraOrigins: [`https://localhost:${proxy.port}`] });
    proxy.target = server.port;
    browser = await launch();
    const [aliceToken, bobToken] = await Promise.all([server.token("alice", "Alice"), server.token("bob", "Bob")]);
    alice = await openUser(browser, chatUrl(`https://localhost:${proxy.port}`, aliceToken));
    bob = await openUser(browser, chatUrl(server.origin, bobToken));
    await Promise.all([waitLive(alice.page), waitLive(bob.page)]);
    await alice.page.locator('.room-button[data-room="general"]').waitFor();
    await bob.page.locator("#composer-input:enabled").waitFor();
  });

  after(async () => {
    await browser?.close();
    await proxy?.close();
    await server?.dispose();
  });

  test("a cut connection: the page shows reconnecting, comes back, and shows the messages sent meanwhile", async () => {
    await sendText(alice.page, "general", "before the cut");
    await waitForBody(bob.page, "general", "before the cut");

    proxy.cut();
    await alice.page.locator('#status[data-state="reconnecting"]', { hasText: /Reconnecting in \d+ s/ }).waitFor({ timeout: WAIT_MS });
    assert.ok(await alice.page.locator("#composer-input").isDisabled(), "no composing into the void");
    await screenshot(alice.page, "reconnecting.png");

    const meanwhile = ["sent while Alice was away", "and another one", "and a third"];
    for (const text of meanwhile) await sendText(bob.page, "general", text);

    proxy.restore();
    await alice.page.locator('#status[data-state="live"]').waitFor({ timeout: RECONNECT_MS });
    for (const text of meanwhile) await waitForBody(alice.page, "general", text);

    const shown = (await shownMessages(alice.page, "general")).map((m) => `${m.sender}: ${m.body}`);
    assert.deepEqual(shown, ["Alice: before the cut", ...meanwhile.map((t) => `Bob: ${t}`)]);
    assert.equal(await alice.page.locator(".gap").count(), 0, "nothing was missed, so no gap marker");

    // The page joined again with the last seq it had seen.
    const joins = alice.record.frames
      .filter((f) => f.dir === "sent")
      .map((f) => JSON.parse(f.text))
      .filter((f) => f.type === "join" && f.room === "general");
    assert.equal(joins.length, 2, JSON.stringify(joins));
    assert.equal(joins[0].since, undefined);
    assert.equal(typeof joins[1].since, "number");

    // And it chats on.
    await sendText(alice.page, "general", "back again");
    await waitForBody(bob.page, "general", "back again");
  });

  test("a server restart: both pages reconnect by themselves and mark the gap", async () => {
    const exit = await server.stop();
    assert.deepEqual(exit, { code: 0, signal: null }, "SIGTERM drains and exits 0");
    for (const user of [alice, bob]) {
      await user.page.locator('#status[data-state="reconnecting"]', { hasText: /Reconnecting in \d+ s/ }).waitFor({ timeout: WAIT_MS });
    }

    await server.start();
    for (const user of [alice, bob]) {
      await user.page.locator('#status[data-state="live"]').waitFor({ timeout: RECONNECT_MS });
      // History lived in the old process: the page says so instead of
      // pretending nothing was missed.
      await user.page.locator(".message-list[data-room=general] .gap").waitFor();
    }
    await bob.page.locator("#composer-input:enabled").waitFor();
    await sendText(bob.page, "general", "after the restart");
    await waitForBody(alice.page, "general", "after the restart");
    const shown = (await shownMessages(alice.page, "general")).map((m) => m.body);
    assert.equal(shown.at(-1), "after the restart");
    assert.ok(shown.includes("before the cut"), "what was shown before stays");
    for (const user of [alice, bob]) {
      assert.deepEqual(user.record.pageErrors, []);
      assert.equal(await user.page.evaluate(() => document.body.dataset.invalidFrames), undefined);
    }
  });
});
