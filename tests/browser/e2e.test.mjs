// An end-to-end encrypted room in real browsers: members with the right
// passphrase read each other, a member with a wrong one sees "cannot
// decrypt", and neither the server's frames nor its logs ever hold the
// plaintext.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { chatUrl, joinWithForm, launch, openUser, screenshot, sendText, shownMessages, waitForBody, waitLive } from "./lib/browser.mjs";
import { TestServer } from "./lib/server.mjs";
import { rawConnect } from "./lib/wsclient.mjs";

const ROOM = "secret-ops";
const PASSPHRASE = "correct horse battery staple";
const SECRETS = ["The eagle lands at dawn", "Roger: dawn it is, bring the <b>maps</b>"];

describe("an end-to-end encrypted room", { timeout: 120_000 }, () => {
  let server;
  let browser;
  let observer;
  const users = {};

  before(async () => {
    server = await TestServer.create();
    browser = await launch();
    const ca = await readFile(join(server.dir, "certs", "ca.crt"));
    // A raw client in the room sees the frames exactly as the server relays them.
    observer = await rawConnect({ port: server.port, ca, token: await server.token("observer", "Observer") });
    await observer.next((f) => f.type === "welcome");
    observer.send({ type: "join", room: ROOM });
    await observer.next((f) => f.type === "joined" && f.room === ROOM);

    for (const [sub, name] of [["alice", "Alice"], ["bob", "Bob"], ["carol", "Carol"]]) {
      users[sub] = await openUser(browser, chatUrl(server.origin, await server.token(sub, name)));
    }
    await Promise.all(Object.values(users).map((u) => waitLive(u.page)));
  });

  after(async () => {
    observer?.close();
    await browser?.close();
    await server?.dispose();
  });

  test("members with the right passphrase read each other; a wrong one shows cannot decrypt", async () => {
    const { alice, bob, carol } = users;
    await Promise.all([
      joinWithForm(alice.page, ROOM, PASSPHRASE),
      joinWithForm(bob.page, ROOM, PASSPHRASE),
      joinWithForm(carol.page, ROOM, "wrong passphrase"),
    ]);
    assert.equal(await alice.page.textContent("#room-badge"), "End-to-end encrypted");

    await sendText(alice.page, ROOM, SECRETS[0]);
    await waitForBody(bob.page, ROOM, SECRETS[0]);
    await sendText(bob.page, ROOM, SECRETS[1]);
    await waitForBody(alice.page, ROOM, SECRETS[1]);

    const expected = [
      { sender: "Alice", body: SECRETS[0] },
      { sender: "Bob", body: SECRETS[1] },
    ];
    for (const user of [alice, bob]) {
      const shown = (await shownMessages(user.page, ROOM)).map(({ sender, body }) => ({ sender, body }));
      assert.deepEqual(shown, expected);
    }

    // Carol has the frames, not the key: she sees who wrote, never garbage.
    await carol.page.waitForFunction(
      (room) => document.querySelectorAll(`.message-list[data-room="${room}"] .body.undecryptable`).length === 2,
      ROOM,
    );
    const carolSees = (await shownMessages(carol.page, ROOM)).map(({ sender, body }) => ({ sender, body }));
    assert.deepEqual(carolSees, [
      { sender: "Alice", body: "cannot decrypt" },
      { sender: "Bob", body: "cannot decrypt" },
    ]);
    await screenshot(alice.page, "e2e-room.png");
    await screenshot(carol.page, "e2e-wrong-passphrase.png");
  });

  test("the server relays only ciphertext: no frame and no log line holds the plaintext", async () => {
    await observer.next((f) => f.type === "message" && f.room === ROOM && f.from.sub === "bob");
    const relayed = observer.frames.filter((f) => f.type === "message");
    assert.equal(relayed.length, 2);
    for (const frame of relayed) {
      assert.equal(frame.body, undefined);
      assert.equal(frame.enc.alg, "A256GCM");
      assert.equal(Buffer.from(frame.enc.iv, "base64").length, 12);
      assert.ok(Buffer.from(frame.enc.ct, "base64").length >= 16);
    }
    assert.equal(relayed[0].enc.kid, relayed[1].enc.kid, "both senders used the same room key");
    assert.notEqual(relayed[0].enc.iv, relayed[1].enc.iv);

    // Everything that crossed the wire, as the observer and every browser
    // saw it, and everything the server logged.
    const wire = [
      ...observer.texts,
      ...Object.values(users).flatMap((u) => u.record.frames.map((f) => f.text)),
      ...server.logs,
    ];
    assert.ok(wire.length > 10);
    for (const secret of SECRETS) {
      for (const piece of [secret, secret.slice(0, 12), "eagle", "maps"]) {
        assert.ok(!wire.some((text) => text.includes(piece)), `"${piece}" crossed the wire or reached the logs`);
      }
    }
  });

  test("plain text never leaves for the room: the server refuses it and the page asks for the key", async () => {
    observer.send({ type: "send", room: ROOM, id: "plain-1", body: "not encrypted" });
    const refusal = await observer.next((f) => f.type === "error" && f.ref === "plain-1");
    assert.equal(refusal.code, "encrypted_room");

    // Dave joins without marking the room as encrypted: his page learns it
    // from `joined` (e2e: true), keeps the text and asks for the key instead
    // of sending it in clear; nothing is relayed.
    const dave = await openUser(browser, chatUrl(server.origin, await server.token("dave", "Dave")));
    await waitLive(dave.page);
    await joinWithForm(dave.page, ROOM);
    await dave.page.fill("#composer-input", "oops, in clear");
    await dave.page.press("#composer-input", "Enter");
    await dave.page.locator(".system.error", { hasText: "end-to-end encrypted" }).waitFor();
    await dave.page.locator("#key-form").waitFor();
    assert.equal(await dave.page.inputValue("#composer-input"), "oops, in clear", "the text is kept");
    // Without the key, what arrives is shown as undecryptable.
    const welcomeDave = "Welcome Dave, the key is the usual one";
    await sendText(users.alice.page, ROOM, welcomeDave);
    await dave.page.locator(`.message-list[data-room="${ROOM}"] .body.undecryptable`).waitFor();
    // The key form fixes it: with the passphrase, the same text goes out encrypted.
    await dave.page.fill("#key-passphrase", PASSPHRASE);
    await dave.page.click("#key-form button[type=submit]");
    await dave.page.locator("#key-form").waitFor({ state: "hidden" });
    await dave.page.press("#composer-input", "Enter");
    await waitForBody(users.alice.page, ROOM, "oops, in clear");
    // Messages received before the key was set are decrypted now too.
    await waitForBody(dave.page, ROOM, welcomeDave);
    assert.ok(!observer.texts.some((t) => t.includes("oops") || t.includes("Welcome")));
    await dave.context.close();
  });
});
