// The client library's connection lifecycle: backoff with jitter, rejoin
// with `since`, gaps, application pings, expiry and refresh.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { BEARER_PREFIX, DEFAULTS, PROTOCOL, backoffDelay } from "../../client/securechat.js";
import { connectLive, fakeToken, joinRoom, message, settle, setup, welcome } from "./fake.mjs";

describe("backoffDelay", () => {
  const options = { initialDelayMs: 500, maxDelayMs: 30_000, factor: 2 };

  test("stays within [step / 2, step] for every attempt and random value", () => {
    for (let attempt = 0; attempt < 20; attempt++) {
      const step = Math.min(30_000, 500 * 2 ** attempt);
      for (const r of [0, 0.001, 0.25, 0.5, 0.75, 0.999, 1]) {
        const delay = backoffDelay(attempt, options, () => r);
        assert.ok(delay >= step / 2 && delay <= step, `attempt ${attempt}, random ${r}: ${delay} not in [${step / 2}, ${step}]`);
      }
    }
  });

  test("grows exponentially, then is capped at maxDelayMs", () => {
    const top = (attempt) => backoffDelay(attempt, options, () => 1);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map(top), [500, 1000, 2000, 4000, 8000, 16000, 30000]);
    assert.equal(top(50), 30_000);
    assert.equal(backoffDelay(50, options, () => 0), 15_000);
  });

  test("jitter spreads clients: different random values give different delays", () => {
    const delays = new Set([0.1, 0.3, 0.6, 0.9].map((r) => backoffDelay(4, options, () => r)));
    assert.equal(delays.size, 4);
  });

  test("a random source out of range cannot push the delay out of bounds", () => {
    assert.equal(backoffDelay(0, options, () => 7), 500);
    assert.equal(backoffDelay(0, options, () => -3), 250);
    assert.equal(backoffDelay(0, options, () => NaN), 250);
  });

  test("uses the defaults", () => {
    assert.equal(backoffDelay(0, undefined, () => 1), DEFAULTS.reconnect.initialDelayMs);
  });
});

describe("connecting", () => {
  test("offers securechat.v1 and the token as a subprotocol entry", () => {
    const t = setup();
    t.client.connect();
    assert.equal(t.ws().url, "wss://chat.test/ws");
    assert.equal(t.ws().protocols[0], PROTOCOL);
    assert.ok(t.ws().protocols[1].startsWith(BEARER_PREFIX));
    assert.equal(t.client.state, "connecting");
    t.ws().receive(welcome(t.clock));
    assert.equal(t.client.state, "live");
    assert.deepEqual(t.client.user, { sub: "alice", name: "Alice", roles: [] });
  });

  test("with cookie credentials, offers only securechat.v1", async () => {
    let renewed = 0;
    const t = setup({
      token: null,
      cookieAuth: true,
      refreshToken: async () => {
        renewed += 1;
      },
    });
    connectLive(t);
    assert.deepEqual(t.ws().protocols, [PROTOCOL]);
    t.ws().drop(4001, "token_expired");
    await settle();
    assert.equal(renewed, 1, "the app renews its cookie");
    assert.equal(t.sockets.length, 2);
    assert.deepEqual(t.ws().protocols, [PROTOCOL]);
  });

  test("does not connect with a token that has already expired", () => {
    const t = setup({ token: fakeToken(Date.now() - 1000) });
    t.clock.time = Date.now();
    t.client.connect();
    assert.equal(t.sockets.length, 0);
    assert.equal(t.client.state, "expired");
  });

  test("gives up on an attempt that gets no welcome", () => {
    const t = setup({ connectTimeoutMs: 5000 });
    t.client.connect();
    t.clock.advance(5000);
    assert.equal(t.sockets[0].closedWith.code, 4000);
    assert.equal(t.client.state, "reconnecting");
  });
});

describe("reconnecting", () => {
  test("backs off exponentially with jitter while the server is unreachable", () => {
    const t = setup({ random: () => 0.5 });
    t.client.connect();
    const delays = [];
    for (let i = 0; i < 8; i++) {
      t.ws().drop(1006);
      const state = t.of("state").at(-1);
      assert.equal(state.state, "reconnecting");
      assert.equal(state.retryAt, t.clock.time + state.delayMs);
      delays.push(state.delayMs);
      const before = t.sockets.length;
      t.clock.advance(state.delayMs - 1);
      assert.equal(t.sockets.length, before, "no attempt before the delay");
      t.clock.advance(1);
      assert.equal(t.sockets.length, before + 1, "an attempt once the delay is over");
    }
    // random 0.5: three quarters of each step 500, 1000, ... capped at 30 s.
    assert.deepEqual(delays, [375, 750, 1500, 3000, 6000, 12000, 22500, 22500]);
  });

  test("with real randomness every delay is within the jitter bounds", () => {
    const t = setup({ random: Math.random });
    t.client.connect();
    for (let attempt = 0; attempt < 10; attempt++) {
      t.ws().drop(1006);
      const { delayMs } = t.of("state").at(-1);
      const step = Math.min(30_000, 500 * 2 ** attempt);
      assert.ok(delayMs >= step / 2 && delayMs <= step, `${delayMs} for step ${step}`);
      t.clock.advance(delayMs);
    }
  });

  test("the backoff starts over once a connection has stayed up", () => {
    const t = setup();
    connectLive(t);
    t.ws().drop(1006);
    t.clock.advance(t.of("state").at(-1).delayMs);
    t.ws().drop(1006);
    assert.equal(t.of("state").at(-1).delayMs, 750, "second attempt");
    t.clock.advance(750);
    t.ws().receive(welcome(t.clock));
    t.clock.advance(DEFAULTS.reconnect.stableAfterMs);
    t.ws().drop(1001, "shutting_down");
    assert.equal(t.of("state").at(-1).delayMs, 375, "first step again");
  });

  test("a connection dropped right after welcome keeps backing off", () => {
    const t = setup();
    connectLive(t);
    const delays = [];
    for (let i = 0; i < 4; i++) {
      t.ws().drop(4008, "rate_limited");
      delays.push(t.of("state").at(-1).delayMs);
      t.clock.advance(delays.at(-1));
      t.ws().receive(welcome(t.clock));
    }
    assert.deepEqual(delays, [375, 750, 1500, 3000]);
  });

  test("joins its rooms again with since = the last seq seen", async () => {
    const t = setup();
    connectLive(t);
    await joinRoom(t, "general", 5);
    await joinRoom(t, "random", 0);
    t.ws().receive(message("general", 6, "six", t.clock));
    t.ws().receive(message("general", 7, "seven", t.clock));
    assert.equal(t.client.lastSeq("general"), 7);

    t.ws().drop(1006);
    t.clock.advance(t.of("state").at(-1).delayMs);
    const second = t.ws();
    assert.deepEqual(second.sent, [], "nothing is sent before welcome");
    second.receive(welcome(t.clock));
    assert.deepEqual(second.sentOf("join"), [
      { type: "join", room: "general", since: 7 },
      { type: "join", room: "random", since: 0 },
    ]);
    second.receive({ type: "joined", room: "general", seq: 9, recovered: true });
    second.receive(message("general", 8, "eight", t.clock));
    second.receive(message("general", 9, "nine", t.clock));
    second.receive({ type: "joined", room: "random", seq: 0, recovered: true });
    assert.deepEqual(
      t.of("message").map((m) => m.body),
      ["six", "seven", "eight", "nine"],
    );
    assert.deepEqual(t.of("gap"), []);
    assert.equal(t.of("joined").at(-2).rejoined, true);
    assert.equal(t.client.lastSeq("general"), 9);
  });

  test("reports a gap when the server could not replay everything", () => {
    const t = setup();
    connectLive(t);
    joinRoom(t, "general", 3);
    t.ws().drop(4009, "slow_consumer");
    t.clock.advance(t.of("state").at(-1).delayMs);
    t.ws().receive(welcome(t.clock));
    t.ws().receive({ type: "joined", room: "general", seq: 500, recovered: false });
    t.ws().receive(message("general", 400, "kept", t.clock));
    assert.deepEqual(t.of("gap"), [{ type: "gap", room: "general", since: 3, seq: 500, restarted: false }]);
    assert.deepEqual(t.of("message").map((m) => m.seq), [400]);
  });

  test("a sequence that went backwards (server restart) is a gap, and new seqs are not mistaken for duplicates", () => {
    const t = setup();
    connectLive(t);
    joinRoom(t, "general", 40);
    t.ws().drop(1001, "shutting_down");
    t.clock.advance(t.of("state").at(-1).delayMs);
    t.ws().receive(welcome(t.clock));
    t.ws().receive({ type: "joined", room: "general", seq: 0, recovered: false });
    assert.deepEqual(t.of("gap"), [{ type: "gap", room: "general", since: 40, seq: 0, restarted: true }]);
    t.ws().receive(message("general", 1, "after the restart", t.clock));
    assert.deepEqual(t.of("message").map((m) => m.body), ["after the restart"]);
    assert.deepEqual(t.of("invalid"), []);
  });

  test("rejoins with the room's epoch; a new epoch means the sequence restarted", () => {
    const t = setup();
    connectLive(t);
    t.client.join("general");
    t.ws().receive({ type: "joined", room: "general", seq: 12, recovered: true, epoch: "e1" });
    t.ws().drop(1001, "shutting_down");
    t.clock.advance(t.of("state").at(-1).delayMs);
    t.ws().receive(welcome(t.clock));
    assert.deepEqual(t.ws().sentOf("join"), [{ type: "join", room: "general", since: 12, epoch: "e1" }]);
    // The room went on past 12 in a new run: the server replays all it holds.
    t.ws().receive({ type: "joined", room: "general", seq: 30, recovered: false, epoch: "e2" });
    assert.deepEqual(t.of("gap"), [{ type: "gap", room: "general", since: 12, seq: 30, restarted: true }]);
    t.ws().receive(message("general", 3, "replayed", t.clock));
    assert.deepEqual(t.of("message").map((m) => m.body), ["replayed"], "low seqs of the new run are not duplicates");
  });

  test("a room left while disconnected is not joined again", async () => {
    const t = setup();
    connectLive(t);
    await joinRoom(t, "general", 1);
    t.ws().drop(1006);
    await t.client.leave("general");
    t.clock.advance(t.of("state").at(-1).delayMs);
    t.ws().receive(welcome(t.clock));
    assert.deepEqual(t.ws().sentOf("join"), []);
  });

  test("a join made while disconnected is sent once connected", async () => {
    const t = setup();
    const joined = t.client.join("general");
    t.client.connect();
    t.ws().receive(welcome(t.clock));
    assert.deepEqual(t.ws().sentOf("join"), [{ type: "join", room: "general" }]);
    t.ws().receive({ type: "joined", room: "general", seq: 12, recovered: true });
    assert.deepEqual(await joined, { room: "general", seq: 12, recovered: true });
  });

  test("close() stops reconnecting for good", () => {
    const t = setup();
    connectLive(t);
    t.ws().drop(1006);
    t.client.close();
    t.clock.advance(120_000);
    assert.equal(t.sockets.length, 1);
    assert.equal(t.client.state, "closed");
  });

  test("reconnectNow() skips the wait", () => {
    const t = setup();
    connectLive(t);
    t.ws().drop(1006);
    t.client.reconnectNow();
    assert.equal(t.sockets.length, 2);
    assert.equal(t.client.state, "connecting");
  });
});

describe("application ping", () => {
  test("pings while live; a connection that stops answering is dropped and replaced", () => {
    const t = setup({ pingIntervalMs: 20_000, pingTimeoutMs: 10_000 });
    connectLive(t);
    t.clock.advance(20_000);
    const pings = t.ws().sentOf("ping");
    assert.equal(pings.length, 1);
    t.ws().receive({ type: "pong", id: pings[0].id });
    t.clock.advance(15_000);
    assert.equal(t.client.state, "live", "answered: still live");

    t.clock.advance(5_000); // second ping, never answered
    assert.equal(t.ws().sentOf("ping").length, 2);
    t.clock.advance(9_999);
    assert.equal(t.client.state, "live");
    t.clock.advance(1);
    assert.equal(t.sockets[0].closedWith.code, 4000);
    assert.equal(t.client.state, "reconnecting");
    assert.equal(t.of("disconnect").at(-1).reason, "ping_timeout");
  });

  test("any frame counts as an answer", () => {
    const t = setup({ pingIntervalMs: 1000, pingTimeoutMs: 500 });
    connectLive(t);
    joinRoom(t, "general", 0);
    for (let seq = 1; seq <= 5; seq++) {
      t.clock.advance(1000);
      t.ws().receive(message("general", seq, "x", t.clock));
    }
    assert.equal(t.client.state, "live");
  });
});

describe("expiry and refresh", () => {
  test("without a refresh callback, close 4001 ends in state expired and no reconnection", () => {
    const t = setup();
    connectLive(t);
    t.ws().receive({ type: "session_expiring", expires_at: new Date(t.clock.time + 60_000).toISOString() });
    assert.deepEqual(t.of("expiring").map((e) => e.refreshing), [false]);
    t.ws().drop(4001, "token_expired");
    assert.equal(t.client.state, "expired");
    t.clock.advance(600_000);
    assert.equal(t.sockets.length, 1);
  });

  test("with a refresh callback, session_expiring sends refresh with the new token", async () => {
    const fresh = fakeToken(Date.now() + 7_200_000);
    const t = setup({ refreshToken: async () => fresh });
    connectLive(t);
    t.ws().receive({ type: "session_expiring", expires_at: new Date(t.clock.time + 60_000).toISOString() });
    await settle();
    assert.deepEqual(t.ws().sentOf("refresh"), [{ type: "refresh", token: fresh }]);
    t.ws().receive({ type: "refreshed", expires_at: "2030-01-01T00:00:00Z" });
    assert.deepEqual(t.of("refreshed").map((e) => e.expires_at), ["2030-01-01T00:00:00Z"]);
    // The next connection uses the new token.
    t.ws().drop(1006);
    t.clock.advance(t.of("state").at(-1).delayMs);
    assert.equal(t.ws().protocols[1], BEARER_PREFIX + fresh);
  });

  test("with a refresh callback, close 4001 fetches a new token and reconnects", async () => {
    const fresh = fakeToken(Date.now() + 7_200_000);
    let calls = 0;
    const t = setup({
      refreshToken: async () => {
        calls += 1;
        return fresh;
      },
    });
    connectLive(t);
    t.ws().drop(4001, "token_expired");
    assert.equal(t.client.state, "connecting");
    await settle();
    assert.equal(calls, 1);
    assert.equal(t.sockets.length, 2);
    assert.equal(t.ws().protocols[1], BEARER_PREFIX + fresh);
  });

  test("a refused refresh is reported and leaves the session as it was", async () => {
    const t = setup();
    connectLive(t);
    const refreshed = t.client.refresh("another-token");
    t.ws().receive({ type: "error", code: "forbidden", message: "a refresh must be for the same user" });
    await assert.rejects(refreshed, { code: "forbidden" });
    assert.equal(t.client.state, "live");
  });
});
