// Test doubles for the client library: a WebSocket whose "server side" the
// test drives, and a clock whose timers run only when the test advances it.

import { SecureChat } from "../../client/securechat.js";

export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.time = start;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.time + Math.max(0, ms), fn });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
    this.now = () => this.time;
  }

  /** Runs every timer due within `ms`, in order, then moves the clock there. */
  advance(ms) {
    const end = this.time + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) {
        if (t.at <= end && (next === null || t.at < next[1].at)) next = [id, t];
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.time = next[1].at;
      next[1].fn();
    }
    this.time = end;
  }
}

/** A WebSocket class recording every instance; `sockets.at(-1)` is the newest. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      this.closedWith = null;
      this.onmessage = null;
      this.onclose = null;
      this.onerror = null;
      sockets.push(this);
    }
    send(text) {
      if (this.closedWith) throw new Error("send on a closed socket");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
    }
    /** The server sends a frame (an object is sent as JSON). */
    receive(frame) {
      this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    }
    /** The connection ends with `code`. */
    drop(code = 1006, reason = "") {
      this.closedWith ??= { code, reason };
      this.onclose?.({ code, reason });
    }
    /** The frames of one type the client sent. */
    sentOf(type) {
      return this.sent.filter((f) => f.type === type);
    }
  }
  return { FakeSocket, sockets };
}

/** An unsigned JWT-shaped token with `exp` (the client only reads exp). */
export function fakeToken(expMs, sub = "alice") {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(expMs / 1000) })}.c2ln`;
}

export function welcome(clock, { sub = "alice", name = "Alice", roles = [] } = {}) {
  return {
    type: "welcome",
    session: "s1",
    user: { sub, name, roles },
    expires_at: new Date(clock.time + 3_600_000).toISOString(),
    limits: { max_message_bytes: 16384, rate_per_sec: 20, burst: 40 },
  };
}

export function message(room, seq, body, clock, from = { sub: "bob", name: "Bob" }) {
  return {
    type: "message",
    room,
    seq,
    id: `m${seq}`.padEnd(32, "0"),
    from,
    body,
    ts: new Date(clock.time).toISOString(),
  };
}

/**
 * A client wired to the fakes, with every event recorded in `events`.
 * `random` defaults to 0.5 so delays are predictable.
 */
export function setup(options = {}) {
  const clock = new FakeClock();
  const { FakeSocket, sockets } = fakeWebSocket();
  const events = [];
  const client = new SecureChat({
    url: "wss://chat.test/ws",
    token: fakeToken(clock.time + 3_600_000),
    WebSocket: FakeSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    ...options,
  });
  for (const type of ["state", "welcome", "joined", "left", "gap", "message", "deleted", "expiring", "refreshed", "error", "invalid", "disconnect"]) {
    client.on(type, (detail) => events.push({ type, ...detail }));
  }
  const of = (type) => events.filter((e) => e.type === type);
  return { clock, sockets, client, events, of, ws: () => sockets.at(-1) };
}

/** Connects and answers with `welcome`. */
export function connectLive(t, user) {
  t.client.connect();
  t.ws().receive(welcome(t.clock, user));
}

/** Joins `room` and answers with `joined` at `seq`. */
export async function joinRoom(t, room, seq = 0) {
  const joined = t.client.join(room);
  t.ws().receive({ type: "joined", room, seq, recovered: true });
  return joined;
}

/** Lets pending promise callbacks run. */
export function settle() {
  return new Promise((done) => setImmediate(done));
}
