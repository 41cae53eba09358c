// The client library's requests and answers: sends resolved by `ack`,
// rejected by `error` with the same `ref` or by a disconnection; requests
// without an id (join, delete) answered in order; and validation of every
// frame the server sends.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { SecureChatError, parseServerFrame } from "../../client/securechat.js";
import { connectLive, joinRoom, message, setup } from "./fake.mjs";

async function live() {
  const t = setup();
  connectLive(t);
  await joinRoom(t, "general", 0);
  return t;
}

describe("send and ack", () => {
  test("a send is resolved by the ack with its id", async () => {
    const t = await live();
    const sent = t.client.send("general", "hello");
    const [frame] = t.ws().sentOf("send");
    assert.equal(frame.room, "general");
    assert.equal(frame.body, "hello");
    assert.ok(frame.id.length >= 1 && frame.id.length <= 64);
    assert.deepEqual(Object.keys(frame).sort(), ["body", "id", "room", "type"], "no from, seq or ts: the server sets those");
    t.ws().receive(message("general", 1, "hello", t.clock, { sub: "alice", name: "Alice" }));
    t.ws().receive({ type: "ack", id: frame.id, room: "general", seq: 1 });
    assert.deepEqual(await sent, { id: frame.id, room: "general", seq: 1 });
  });

  test("acks are matched by id, whatever their order", async () => {
    const t = await live();
    const first = t.client.send("general", "one");
    const second = t.client.send("general", "two");
    const [a, b] = t.ws().sentOf("send");
    assert.notEqual(a.id, b.id);
    t.ws().receive({ type: "ack", id: b.id, room: "general", seq: 8 });
    t.ws().receive({ type: "ack", id: a.id, room: "general", seq: 7 });
    assert.equal((await first).seq, 7);
    assert.equal((await second).seq, 8);
  });

  test("an error with the same ref rejects that send, and only that one", async () => {
    const t = await live();
    const refused = t.client.send("general", "too fast");
    const fine = t.client.send("general", "fine");
    const [a, b] = t.ws().sentOf("send");
    t.ws().receive({ type: "error", code: "rate_limited", message: "slow down", ref: a.id });
    await assert.rejects(refused, (e) => {
      assert.ok(e instanceof SecureChatError);
      assert.equal(e.code, "rate_limited");
      assert.equal(e.message, "slow down");
      assert.equal(e.ref, a.id);
      assert.equal(e.room, "general");
      return true;
    });
    t.ws().receive({ type: "ack", id: b.id, room: "general", seq: 1 });
    assert.equal((await fine).seq, 1);
    assert.deepEqual(t.of("error"), [], "an answered error is not reported again");
  });

  test("pending sends are rejected with disconnected when the connection drops", async () => {
    const t = await live();
    const pending = [t.client.send("general", "a"), t.client.send("general", "b")];
    const ids = t.ws().sentOf("send").map((f) => f.id);
    const old = t.ws();
    old.drop(1006);
    for (const p of pending) await assert.rejects(p, { code: "disconnected" });
    // A late ack from the old socket is ignored.
    old.receive({ type: "ack", id: ids[0], room: "general", seq: 1 });
    assert.deepEqual(t.of("invalid"), []);
  });

  test("an ack nobody waits for is reported and dropped", async () => {
    const t = await live();
    t.ws().receive({ type: "ack", id: "c-unknown", room: "general", seq: 3 });
    assert.equal(t.of("invalid").length, 1);
    assert.match(t.of("invalid")[0].reason, /ack/);
  });

  test("an unanswered send times out", async () => {
    const t = setup({ sendTimeoutMs: 1000, pingIntervalMs: 60_000 });
    connectLive(t);
    await joinRoom(t, "general");
    const sent = t.client.send("general", "hello?");
    t.clock.advance(1000);
    await assert.rejects(sent, { code: "timeout" });
  });

  test("sends that cannot succeed are refused before they leave", async () => {
    const t = setup();
    await assert.rejects(t.client.send("general", "x"), { code: "not_connected" });
    connectLive(t);
    await assert.rejects(t.client.send("general", "x"), { code: "not_joined" });
    await joinRoom(t, "general");
    await assert.rejects(t.client.send("general", "   "), { code: "invalid_message" });
    await assert.rejects(t.client.send("general", "a\rb"), { code: "invalid_message" });
    // Over limits.max_message_bytes the server would close the connection.
    await assert.rejects(t.client.send("general", "x".repeat(16384)), { code: "too_large" });
    await assert.rejects(t.client.sendEncrypted("general", { alg: "A256GCM", kid: "k", iv: "short", ct: "x" }), {
      code: "invalid_message",
    });
    assert.deepEqual(t.ws().sentOf("send"), []);
  });
});

describe("encrypted rooms", () => {
  test("plain text never leaves for a room known to be encrypted", async () => {
    const t = setup();
    connectLive(t);
    const joined = t.client.join("secret-ops", { e2e: true });
    t.ws().receive({ type: "joined", room: "secret-ops", seq: 0, recovered: true });
    await joined;
    await assert.rejects(t.client.send("secret-ops", "in clear"), { code: "encrypted_room" });
    assert.deepEqual(t.ws().sentOf("send"), []);
  });

  test("the server's encrypted_room error and enc messages teach the client which rooms are encrypted", async () => {
    const t = await live();
    await joinRoom(t, "secret-a");
    await joinRoom(t, "secret-b");
    const first = t.client.send("secret-a", "oops");
    const [frame] = t.ws().sentOf("send");
    t.ws().receive({ type: "error", code: "encrypted_room", message: "send enc", ref: frame.id });
    await assert.rejects(first, { code: "encrypted_room" });
    assert.equal(t.client.isEncrypted("secret-a"), true);
    await assert.rejects(t.client.send("secret-a", "again"), { code: "encrypted_room" });

    const enc = { alg: "A256GCM", kid: "p-1", iv: "AAAAAAAAAAAAAAAA", ct: "AAAAAAAAAAAAAAAAAAAAAA==" };
    t.ws().receive({ ...message("secret-b", 1, "x", t.clock), body: undefined, enc });
    assert.deepEqual(t.of("message").at(-1).enc, enc);
    assert.equal(t.client.isEncrypted("secret-b"), true);
    assert.equal(t.client.isEncrypted("general"), false);
    assert.equal(t.ws().sentOf("send").length, 1);
  });

  test("a joined.e2e from a newer server is taken into account", async () => {
    const t = setup();
    connectLive(t);
    const joined = t.client.join("secret-ops");
    t.ws().receive({ type: "joined", room: "secret-ops", seq: 0, recovered: true, e2e: true });
    await joined;
    assert.equal(t.of("joined").at(-1).e2e, true);
    assert.equal(t.client.isEncrypted("secret-ops"), true);
  });
});

describe("requests without an id", () => {
  test("an error without ref answers the oldest join", async () => {
    const t = setup();
    connectLive(t);
    const missing = t.client.join("nowhere");
    const general = t.client.join("general");
    t.ws().receive({ type: "error", code: "unknown_room", message: "no such room" });
    t.ws().receive({ type: "joined", room: "general", seq: 2, recovered: true });
    await assert.rejects(missing, { code: "unknown_room", room: "nowhere" });
    assert.equal((await general).seq, 2);
    assert.deepEqual(t.client.rooms, ["general"]);
  });

  test("delete resolves at the pong behind it, or rejects with the error before it", async () => {
    const t = await live();
    const ok = t.client.delete("general", 4);
    const [ping] = t.ws().sentOf("ping");
    assert.deepEqual(t.ws().sentOf("delete"), [{ type: "delete", room: "general", seq: 4 }]);
    t.ws().receive({ type: "deleted", room: "general", seq: 4, by: "alice" });
    t.ws().receive({ type: "pong", id: ping.id });
    await ok;
    assert.deepEqual(t.of("deleted").map((d) => d.seq), [4]);

    const refused = t.client.delete("general", 5);
    const barrier = t.ws().sentOf("ping").at(-1);
    t.ws().receive({ type: "error", code: "forbidden", message: "only the author or a moderator" });
    t.ws().receive({ type: "pong", id: barrier.id });
    await assert.rejects(refused, { code: "forbidden" });
    assert.deepEqual(t.of("invalid"), [], "the pong of a refused delete is expected");
  });

  test("a leave is answered by left", async () => {
    const t = await live();
    const left = t.client.leave("general");
    assert.deepEqual(t.ws().sentOf("leave"), [{ type: "leave", room: "general" }]);
    t.ws().receive(message("general", 1, "in flight", t.clock));
    t.ws().receive({ type: "left", room: "general", reason: "left" });
    await left;
    assert.deepEqual(t.of("message"), [], "messages of a room being left are dropped");
    assert.deepEqual(t.of("invalid"), []);
  });

  test("a kick ends the membership and the room is not joined again", async () => {
    const t = await live();
    t.ws().receive({ type: "left", room: "general", reason: "kicked" });
    assert.deepEqual(t.of("left").map((l) => l.reason), ["kicked"]);
    assert.deepEqual(t.client.rooms, []);
  });
});

describe("validation of server frames", () => {
  const malformed = [
    ["not JSON", "{nope"],
    ["not an object", "[1,2]"],
    ["no type", { room: "general" }],
    ["unknown type", { type: "eval", code: "alert(1)" }],
    ["body and enc together", { ...message("general", 1, "x", { time: 0 }), enc: { alg: "A256GCM", kid: "k", iv: "AAAAAAAAAAAAAAAA", ct: "AAAAAAAAAAAAAAAAAAAAAA==" } }],
    ["neither body nor enc", (() => { const m = message("general", 1, "x", { time: 0 }); delete m.body; return m; })()],
    ["no from", (() => { const m = message("general", 1, "x", { time: 0 }); delete m.from; return m; })()],
    ["from.name not a string", { ...message("general", 1, "x", { time: 0 }), from: { sub: "bob", name: { html: "<b>" } } }],
    ["seq zero", message("general", 0, "x", { time: 0 })],
    ["seq a string", { ...message("general", 1, "x", { time: 0 }), seq: "1" }],
    ["bad room name", message("<script>", 1, "x", { time: 0 })],
    ["bad ts", { ...message("general", 1, "x", { time: 0 }), ts: "yesterday" }],
    ["control character in body", message("general", 1, "a\u0000b", { time: 0 })],
    ["enc with a short iv", { ...message("general", 1, "x", { time: 0 }), body: undefined, enc: { alg: "A256GCM", kid: "k", iv: "AAAA", ct: "AAAAAAAAAAAAAAAAAAAAAA==" } }],
    ["enc with a short ct", { ...message("general", 1, "x", { time: 0 }), body: undefined, enc: { alg: "A256GCM", kid: "k", iv: "AAAAAAAAAAAAAAAA", ct: "AAAA" } }],
    ["enc with another alg", { ...message("general", 1, "x", { time: 0 }), body: undefined, enc: { alg: "none", kid: "k", iv: "AAAAAAAAAAAAAAAA", ct: "AAAAAAAAAAAAAAAAAAAAAA==" } }],
    ["ack without seq", { type: "ack", id: "c1", room: "general" }],
    ["error without code", { type: "error", message: "x" }],
    ["joined without recovered", { type: "joined", room: "general", seq: 1 }],
  ];

  for (const [name, frame] of malformed) {
    test(`drops and reports: ${name}`, async () => {
      const t = await live();
      const text = typeof frame === "string" ? frame : JSON.stringify(frame);
      assert.doesNotThrow(() => t.ws().receive(text));
      assert.equal(t.of("invalid").length, 1, name);
      assert.deepEqual(t.of("message"), []);
      assert.deepEqual(t.of("error"), []);
      assert.equal(t.client.state, "live", "a bad frame does not end the connection");
    });
  }

  test("drops binary frames", async () => {
    const t = await live();
    t.ws().onmessage({ data: new ArrayBuffer(8) });
    assert.equal(t.of("invalid").length, 1);
  });

  test("drops unexpected frames: before welcome, a second welcome, rooms not joined, duplicates", async () => {
    const t = setup();
    t.client.connect();
    t.ws().receive(message("general", 1, "early", t.clock));
    t.ws().receive({ type: "welcome", session: "s", user: { sub: "alice", name: "Alice", roles: [] }, expires_at: "2030-01-01T00:00:00Z", limits: { max_message_bytes: 16384, rate_per_sec: 20, burst: 40 } });
    t.ws().receive({ type: "welcome", session: "s2", user: { sub: "mallory", name: "M", roles: ["admin"] }, expires_at: "2030-01-01T00:00:00Z", limits: { max_message_bytes: 16384, rate_per_sec: 20, burst: 40 } });
    t.ws().receive(message("elsewhere", 1, "not joined", t.clock));
    t.ws().receive({ type: "joined", room: "general", seq: 0, recovered: true });
    await joinRoom(t, "general", 0);
    t.ws().receive(message("general", 1, "first", t.clock));
    t.ws().receive(message("general", 1, "again", t.clock));
    t.ws().receive({ type: "deleted", room: "elsewhere", seq: 1, by: "x" });
    t.ws().receive({ type: "refreshed", expires_at: "2030-01-01T00:00:00Z" });
    t.ws().receive({ type: "pong", id: "b-never-sent" });
    assert.deepEqual(t.of("message").map((m) => m.body), ["first"]);
    assert.equal(t.client.user.sub, "alice");
    assert.equal(t.of("invalid").length, 8, JSON.stringify(t.of("invalid").map((i) => i.reason)));
  });

  test("a listener that throws does not break the client", async () => {
    const t = await live();
    const reported = [];
    const original = globalThis.reportError;
    globalThis.reportError = (e) => reported.push(e);
    try {
      t.client.on("message", () => {
        throw new Error("app bug");
      });
      t.ws().receive(message("general", 1, "one", t.clock));
      t.ws().receive(message("general", 2, "two", t.clock));
    } finally {
      globalThis.reportError = original;
    }
    assert.equal(reported.length, 2);
    assert.deepEqual(t.of("message").map((m) => m.seq), [1, 2]);
  });

  test("keeps only the fields the contract defines", () => {
    const { frame } = parseServerFrame(
      JSON.stringify({ ...message("general", 3, "hi", { time: 0 }), html: "<b>", __proto__: { polluted: true } }),
    );
    assert.deepEqual(Object.keys(frame).sort(), ["body", "from", "id", "room", "seq", "ts", "type"]);
    assert.equal({}.polluted, undefined);
  });
});
