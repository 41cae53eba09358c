// securechat client library: a dependency-free ES module for browsers (and
// any runtime with WebSocket and WebCrypto).
//
//   import { SecureChat } from "/securechat.js";
//   const chat = new SecureChat({ token, refreshToken: fetchNewToken });
//   chat.on("message", (m) => render(m));   // m.body is text: never innerHTML
//   chat.on("state", (s) => showState(s));
//   chat.connect();
//   await chat.join("general");
//   await chat.send("general", "hello");    // resolves on `ack`
//
// What it does for the application:
// - connects with the `securechat.v1` and `securechat.bearer.<token>`
//   subprotocols (browsers cannot set an Authorization header);
// - validates every frame it receives; a malformed or unexpected frame is
//   reported as an `invalid` event and dropped, never passed on;
// - resolves each `send` with its `ack`, rejects it with the `error` that
//   carries its id as `ref`, or with `disconnected` when the socket goes;
// - sends the protocol's own `ping` (browsers cannot send WebSocket pings)
//   and drops a connection that stops answering;
// - reconnects with exponential backoff and jitter, joins its rooms again
//   with `since`, and reports a `gap` when the server could not replay
//   everything;
// - refreshes the token on `session_expiring` when given a callback.
//
// End-to-end encryption helpers (deriveRoomKey, importRoomKey,
// encryptMessage, decryptMessage) are at the end of this file; see
// docs/client.md for what they protect and what they do not.

/** The subprotocol every connection offers. */
export const PROTOCOL = "securechat.v1";
/** The prefix of the subprotocol entry that carries the token. */
export const BEARER_PREFIX = "securechat.bearer.";

/** Defaults for the options of {@link SecureChat}. */
export const DEFAULTS = Object.freeze({
  reconnect: Object.freeze({
    initialDelayMs: 500,
    maxDelayMs: 30_000,
    factor: 2,
    // The attempt counter is reset only after a connection stayed up this
    // long, so a server that accepts and then drops at once is not hammered.
    stableAfterMs: 10_000,
  }),
  pingIntervalMs: 20_000,
  pingTimeoutMs: 10_000,
  connectTimeoutMs: 15_000,
  sendTimeoutMs: 30_000,
});

/** An error with the protocol's `code` (or one of the client's own codes). */
export class SecureChatError extends Error {
  constructor(code, message, details = {}) {
    super(message || code);
    this.name = "SecureChatError";
    /** `invalid_message`, `forbidden`, ... or `disconnected`, `not_connected`, `timeout`, `closed`, `cannot_decrypt`. */
    this.code = code;
    /** The client id the server's error answered, when it had one. */
    this.ref = details.ref;
    /** The room the request was for, when it had one. */
    this.room = details.room;
  }
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first): the
 * exponential step `min(maxDelayMs, initialDelayMs * factor ** attempt)`,
 * with "equal jitter": uniformly random in [step / 2, step].
 */
export function backoffDelay(attempt, options = DEFAULTS.reconnect, random = Math.random) {
  const initial = options.initialDelayMs ?? DEFAULTS.reconnect.initialDelayMs;
  const max = options.maxDelayMs ?? DEFAULTS.reconnect.maxDelayMs;
  const factor = options.factor ?? DEFAULTS.reconnect.factor;
  const step = Math.min(max, initial * Math.pow(factor, Math.max(0, attempt)));
  const r = Math.min(1, Math.max(0, Number(random()) || 0));
  return Math.round(step / 2 + (r * step) / 2);
}

/** The WebSocket URL of the server that served the current page. */
export function defaultUrl(location = globalThis.location, path = "/ws") {
  if (!location) throw new SecureChatError("invalid_options", "no url given and no page location to derive it from");
  const url = new URL(path, location.href);
  url.protocol = url.protocol === "http:" ? "ws:" : "wss:";
  url.hash = "";
  url.search = "";
  return url.href;
}

/**
 * The `exp` of a JWT in milliseconds, read without verifying it (only to
 * avoid connecting with a token that has already expired), or null.
 */
export function tokenExpiry(token) {
  if (typeof token !== "string") return null;
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const json = JSON.parse(new TextDecoder().decode(fromBase64(part.replace(/-/g, "+").replace(/_/g, "/"))));
    return Number.isFinite(json.exp) ? json.exp * 1000 : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------
// Validation of server frames: pure, no I/O.

const ROOM_RE = /^[A-Za-z0-9._\-:@+]{1,128}$/;
const TIME_RE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$/;
// Control characters other than tab and newline, as the server refuses them.
const CONTROL_RE = /[\u0000-\u0008\u000b-\u001f\u007f]/;
const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Whether `name` is a valid room name (1 to 128 of `A-Z a-z 0-9 . _ - : @ +`). */
export function isRoomName(name) {
  return typeof name === "string" && ROOM_RE.test(name);
}

class Invalid extends Error {}

function fail(reason) {
  throw new Invalid(reason);
}
function isObject(v) {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
function str(obj, key, { min = 1, max = 4096, optional = false } = {}) {
  const v = obj[key];
  if (v === undefined && optional) return undefined;
  if (typeof v !== "string") fail(`${key} must be a string`);
  if (v.length < min || v.length > max) fail(`${key} has a bad length`);
  return v;
}
function int(obj, key, min) {
  const v = obj[key];
  if (!Number.isSafeInteger(v) || v < min) fail(`${key} must be an integer >= ${min}`);
  return v;
}
function bool(obj, key) {
  if (typeof obj[key] !== "boolean") fail(`${key} must be a boolean`);
  return obj[key];
}
function room(obj) {
  const v = obj.room;
  if (!isRoomName(v)) fail("room is not a valid room name");
  return v;
}
function time(obj, key) {
  const v = str(obj, key, { max: 64 });
  if (!TIME_RE.test(v) || !Number.isFinite(Date.parse(v))) fail(`${key} is not an RFC 3339 time`);
  return v;
}
function base64Length(v) {
  if (typeof v !== "string" || !BASE64_RE.test(v)) return -1;
  const pad = v.endsWith("==") ? 2 : v.endsWith("=") ? 1 : 0;
  return (v.length / 4) * 3 - pad;
}

/** Checks an `enc` payload's shape: alg A256GCM, kid 1-64, 12-byte iv, ct >= 16 bytes. */
export function validEnc(enc) {
  try {
    return cleanEnc(enc);
  } catch {
    return null;
  }
}
function cleanEnc(enc) {
  if (!isObject(enc)) fail("enc must be an object");
  if (enc.alg !== "A256GCM") fail("enc.alg must be A256GCM");
  const kid = str(enc, "kid", { max: 64 });
  if (base64Length(enc.iv) !== 12) fail("enc.iv must be 12 bytes of base64");
  if (base64Length(enc.ct) < 16) fail("enc.ct must be at least 16 bytes of base64");
  return { alg: "A256GCM", kid, iv: enc.iv, ct: enc.ct };
}
function user(obj, key) {
  const u = obj[key];
  if (!isObject(u)) fail(`${key} must be an object`);
  const sub = str(u, "sub", { max: 256 });
  const name = str(u, "name", { max: 256 });
  if (CONTROL_RE.test(sub) || CONTROL_RE.test(name)) fail(`${key} holds control characters`);
  return { sub, name };
}

const SCHEMAS = {
  welcome(f) {
    const u = user(f, "user");
    const roles = f.user.roles;
    if (!Array.isArray(roles) || !roles.every((r) => typeof r === "string" && r.length > 0 && r.length <= 64)) {
      fail("user.roles must be an array of strings");
    }
    const limits = f.limits;
    if (!isObject(limits)) fail("limits must be an object");
    return {
      session: str(f, "session", { max: 128 }),
      user: { ...u, roles: [...roles] },
      expires_at: time(f, "expires_at"),
      limits: {
        max_message_bytes: int(limits, "max_message_bytes", 1),
        rate_per_sec: int(limits, "rate_per_sec", 1),
        burst: int(limits, "burst", 1),
      },
    };
  },
  joined(f) {
    const out = { room: room(f), seq: int(f, "seq", 0), recovered: bool(f, "recovered") };
    // Not in the v1 contract: kept when a server announces them.
    if (f.e2e !== undefined) out.e2e = bool(f, "e2e");
    if (f.epoch !== undefined) out.epoch = str(f, "epoch", { max: 64 });
    return out;
  },
  left: (f) => ({ room: room(f), reason: str(f, "reason", { max: 64 }) }),
  message(f) {
    const out = { room: room(f), seq: int(f, "seq", 1), id: str(f, "id", { max: 128 }), from: user(f, "from"), ts: time(f, "ts") };
    const hasBody = f.body !== undefined;
    const hasEnc = f.enc !== undefined;
    if (hasBody === hasEnc) fail("a message carries exactly one of body and enc");
    if (hasBody) {
      const body = str(f, "body", { max: 1 << 20 });
      if (CONTROL_RE.test(body)) fail("body holds control characters");
      out.body = body;
    } else {
      out.enc = cleanEnc(f.enc);
    }
    return out;
  },
  ack: (f) => ({ id: str(f, "id", { max: 64 }), room: room(f), seq: int(f, "seq", 1) }),
  deleted: (f) => ({ room: room(f), seq: int(f, "seq", 1), by: str(f, "by", { max: 256 }) }),
  refreshed: (f) => ({ expires_at: time(f, "expires_at") }),
  session_expiring: (f) => ({ expires_at: time(f, "expires_at") }),
  pong(f) {
    const id = str(f, "id", { min: 0, max: 64, optional: true });
    return id === undefined ? {} : { id };
  },
  error(f) {
    const out = { code: str(f, "code", { max: 64 }), message: str(f, "message", { min: 0, max: 4096 }) };
    const ref = str(f, "ref", { min: 0, max: 64, optional: true });
    if (ref !== undefined) out.ref = ref;
    return out;
  },
};

/**
 * Parses and validates one text frame from the server. Returns
 * `{ frame }` with a clean copy holding only the fields the contract
 * defines (fields added by a newer server are left out), or
 * `{ error }` saying what is wrong. Never throws.
 */
export function parseServerFrame(text) {
  if (typeof text !== "string") return { error: "not a text frame" };
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return { error: "not JSON" };
  }
  if (!isObject(value)) return { error: "not a JSON object" };
  const type = value.type;
  if (typeof type !== "string" || !Object.hasOwn(SCHEMAS, type)) return { error: "unknown type" };
  try {
    return { frame: { type, ...SCHEMAS[type](value) } };
  } catch (e) {
    if (e instanceof Invalid) return { error: `${type}: ${e.message}` };
    return { error: `${type}: malformed` };
  }
}

// ---------------------------------------------------------------------------
// The client.

const LIVE_PING = "p-";
const BARRIER = "b-";

/**
 * A connection to a securechat server that survives disconnections.
 * Events (subscribe with {@link SecureChat#on}): `state`, `welcome`,
 * `joined`, `left`, `gap`, `message`, `deleted`, `expiring`, `refreshed`,
 * `error`, `invalid`, `disconnect`. See securechat.d.ts for their payloads.
 */
export class SecureChat {
  constructor(options = {}) {
    this._url = options.url ?? defaultUrl();
    this._token = options.token ?? null;
    // The server reads the token from an HttpOnly cookie (`auth.cookie`):
    // nothing to send, nothing for a script to steal.
    this._cookieAuth = options.cookieAuth === true;
    this._refreshToken = typeof options.refreshToken === "function" ? options.refreshToken : null;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._setTimeout = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    this._clearTimeout = options.clearTimeout ?? ((id) => globalThis.clearTimeout(id));
    this._random = options.random ?? Math.random;
    this._now = options.now ?? Date.now;
    this._reconnect = { ...DEFAULTS.reconnect, ...(options.reconnect ?? {}) };
    this._pingIntervalMs = options.pingIntervalMs ?? DEFAULTS.pingIntervalMs;
    this._pingTimeoutMs = options.pingTimeoutMs ?? DEFAULTS.pingTimeoutMs;
    this._connectTimeoutMs = options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs;
    this._sendTimeoutMs = options.sendTimeoutMs ?? DEFAULTS.sendTimeoutMs;
    if (typeof this._WebSocket !== "function") throw new SecureChatError("invalid_options", "no WebSocket implementation");

    this._listeners = new Map();
    this._state = "idle";
    this._ws = null;
    this._welcome = null;
    this._closing = false;
    this._attempt = 0;
    this._timers = new Map();
    /** room name -> { joined, lastSeq, waiters: [{resolve, reject}] } */
    this._rooms = new Map();
    /** client id -> { room, resolve, reject, timer } */
    this._sends = new Map();
    /** Requests without an id, answered in order: join, leave, refresh, barrier (delete, kick). */
    this._fifo = [];
    this._spentBarriers = new Set();
    this._counter = 0;
    this._prefix = Math.floor(this._random() * 0x100000000).toString(36);
    this._refreshing = false;
    this._reauthenticating = false;
    /** Rooms left whose `left` has not arrived yet: their frames are dropped quietly. */
    this._leaving = new Set();
  }

  /** `idle`, `connecting`, `live`, `reconnecting`, `expired` or `closed`. */
  get state() {
    return this._state;
  }
  /** The user the server named in `welcome` (`sub`, `name`, `roles`), once connected. */
  get user() {
    return this._welcome ? { ...this._welcome.user, roles: [...this._welcome.user.roles] } : null;
  }
  /** The limits the server announced in `welcome`. */
  get limits() {
    return this._welcome ? { ...this._welcome.limits } : null;
  }
  /** The rooms this client is in, or will join again after a reconnection. */
  get rooms() {
    return [...this._rooms.keys()];
  }
  /** The last `seq` seen in `room` (what the next join sends as `since`), or null. */
  lastSeq(room) {
    return this._rooms.get(room)?.lastSeq ?? null;
  }
  /** Whether `room` is known to be end-to-end encrypted (plain sends to it are refused here). */
  isEncrypted(room) {
    return this._rooms.get(room)?.e2e === true;
  }
  /**
   * Marks `room` as end-to-end encrypted: from now on `send` refuses plain
   * text for it before it leaves (the server does not announce which rooms
   * are encrypted, so the app must say so; the library also learns it from
   * an `encrypted_room` error or an `enc` message).
   */
  markEncrypted(room) {
    const r = this._rooms.get(room);
    if (r) r.e2e = true;
  }

  /** Subscribes to an event; returns a function that unsubscribes. */
  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }
  off(type, listener) {
    this._listeners.get(type)?.delete(listener);
  }
  _emit(type, detail) {
    for (const listener of [...(this._listeners.get(type) ?? [])]) {
      try {
        listener(detail);
      } catch (e) {
        // A failing listener must not break the connection's bookkeeping.
        if (typeof globalThis.reportError === "function") globalThis.reportError(e);
        else console.error(e);
      }
    }
  }
  _setState(state, detail = {}) {
    const previous = this._state;
    this._state = state;
    this._emit("state", { state, previous, ...detail });
  }

  /** Replaces the token used from the next connection on. */
  setToken(token) {
    this._token = token;
  }

  /** Opens the connection (no-op while connecting or live). */
  connect() {
    if (this._state === "connecting" || this._state === "live") return;
    this._closing = false;
    this._attempt = 0;
    this._clearTimer("reconnect");
    this._open();
  }

  /** While waiting to reconnect, tries at once. */
  reconnectNow() {
    if (this._state === "reconnecting") {
      this._clearTimer("reconnect");
      this._open();
    }
  }

  /** Closes the connection for good; pending requests are rejected with `closed`. */
  close() {
    this._closing = true;
    this._clearTimer("reconnect");
    for (const [, r] of this._rooms) this._rejectWaiters(r, new SecureChatError("closed", "the client was closed"));
    if (this._ws) {
      const ws = this._detach();
      try {
        ws.close(1000, "normal");
      } catch {
        // Already closing.
      }
      this._afterClose({ code: 1000, reason: "normal" });
    } else {
      this._clearTimers();
      this._setState("closed", { code: 1000, reason: "normal" });
    }
  }

  /**
   * Joins `room`. Resolves with `{room, seq, recovered}` once joined (also
   * when the join waits for a connection); rejects with the server's error.
   * The room is joined again after every reconnection, with `since`.
   */
  join(room, options = {}) {
    if (!isRoomName(room)) return Promise.reject(new SecureChatError("invalid_message", "not a valid room name", { room }));
    if (this._state === "closed" || this._state === "expired") {
      return Promise.reject(new SecureChatError("not_connected", "the client is not connected", { room }));
    }
    let r = this._rooms.get(room);
    if (r && options.e2e === true) r.e2e = true;
    if (r?.joined) return Promise.resolve({ room, seq: r.lastSeq ?? 0, recovered: true });
    if (!r) {
      r = { joined: false, lastSeq: Number.isSafeInteger(options.since) ? options.since : null, e2e: options.e2e === true, waiters: [] };
      this._rooms.set(room, r);
      if (this._welcome && this._ws) this._sendJoin(room, r);
    }
    return new Promise((resolve, reject) => r.waiters.push({ resolve, reject }));
  }

  /** Leaves `room` and stops joining it after reconnections. */
  leave(room) {
    const r = this._rooms.get(room);
    if (!r) return Promise.resolve();
    this._rooms.delete(room);
    this._rejectWaiters(r, new SecureChatError("left", "left the room before it was joined", { room }));
    if (!this._live()) return Promise.resolve();
    this._leaving.add(room);
    // A join still on its way is answered first; the leave follows it.
    return new Promise((resolve, reject) => {
      this._fifo.push({ kind: "leave", room, resolve, reject });
      this._write({ type: "leave", room });
    });
  }

  /** Sends a text message; resolves with the `ack` (`{id, room, seq}`). */
  send(room, body) {
    if (typeof body !== "string" || body.trim() === "") {
      return Promise.reject(new SecureChatError("invalid_message", "the message is empty", { room }));
    }
    if (CONTROL_RE.test(body)) {
      return Promise.reject(new SecureChatError("invalid_message", "the message holds control characters", { room }));
    }
    if (this.isEncrypted(room)) {
      // Plain text never leaves for a room known to be encrypted.
      return Promise.reject(new SecureChatError("encrypted_room", "this room is end-to-end encrypted: encrypt the message", { room }));
    }
    return this._send(room, { body });
  }

  /** Sends an end-to-end encrypted payload (see {@link encryptMessage}). */
  sendEncrypted(room, enc) {
    const clean = validEnc(enc);
    if (!clean) return Promise.reject(new SecureChatError("invalid_message", "not a valid enc payload", { room }));
    return this._send(room, { enc: clean });
  }

  _send(room, payload) {
    if (!this._live()) return Promise.reject(new SecureChatError("not_connected", "not connected", { room }));
    if (!this._rooms.get(room)?.joined) return Promise.reject(new SecureChatError("not_joined", "join the room first", { room }));
    const id = this._nextId("c");
    const frame = JSON.stringify({ type: "send", room, id, ...payload });
    const max = this._welcome.limits.max_message_bytes;
    if (new TextEncoder().encode(frame).length > max) {
      // The server would close the connection (1009) for this.
      return Promise.reject(new SecureChatError("too_large", `the message is larger than ${max} bytes`, { room }));
    }
    return new Promise((resolve, reject) => {
      const timer = this._setTimeout(() => {
        if (this._sends.delete(id)) reject(new SecureChatError("timeout", "no answer from the server", { ref: id, room }));
      }, this._sendTimeoutMs);
      this._sends.set(id, { room, resolve, reject, timer });
      this._writeRaw(frame);
    });
  }

  /** Deletes message `seq` of `room` (author or moderator). Resolves when done. */
  delete(room, seq) {
    return this._barrier(room, { type: "delete", room, seq });
  }

  /** Removes user `user` (a `sub`) from `room` (moderators). */
  kick(room, userId) {
    return this._barrier(room, { type: "kick", room, user: userId });
  }

  // `delete` and `kick` get no answer on success, and an error without
  // `ref` on failure: a `ping` sent right behind them tells which, since the
  // server answers a connection's frames in order.
  _barrier(room, frame) {
    if (!this._live()) return Promise.reject(new SecureChatError("not_connected", "not connected", { room }));
    if (!this._rooms.get(room)?.joined) return Promise.reject(new SecureChatError("not_joined", "join the room first", { room }));
    const id = this._nextId(BARRIER);
    return new Promise((resolve, reject) => {
      this._fifo.push({ kind: "barrier", room, id, resolve, reject });
      this._write(frame);
      this._write({ type: "ping", id });
    });
  }

  /** Replaces the session's token on the open connection (`refresh`). */
  refresh(token) {
    if (typeof token !== "string" || token === "") return Promise.reject(new SecureChatError("invalid_message", "no token"));
    if (!this._live()) {
      this._token = token;
      if (this._state === "expired") this.connect();
      return Promise.resolve({ expires_at: null });
    }
    return new Promise((resolve, reject) => {
      this._fifo.push({ kind: "refresh", token, resolve, reject });
      this._write({ type: "refresh", token });
    });
  }

  // --- connection lifecycle ------------------------------------------------

  _live() {
    return this._state === "live" && this._ws !== null && this._welcome !== null;
  }

  _open() {
    if (this._closing) return;
    if (!this._cookieAuth) {
      const expiry = tokenExpiry(this._token);
      if (!this._token || (expiry !== null && expiry <= this._now())) {
        this._expired({ code: null, reason: this._token ? "token_expired" : "no_token" });
        return;
      }
    }
    const protocols = this._cookieAuth ? [PROTOCOL] : [PROTOCOL, BEARER_PREFIX + this._token];
    let ws;
    try {
      ws = new this._WebSocket(this._url, protocols);
    } catch (e) {
      this._emit("error", { code: "connect_failed", message: String(e?.message ?? e) });
      this._scheduleReconnect({ code: null, reason: "connect_failed" });
      return;
    }
    this._ws = ws;
    this._welcome = null;
    ws.onmessage = (event) => {
      if (this._ws === ws) this._onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws === ws) {
        this._detach();
        this._afterClose({ code: event.code, reason: event.reason });
      }
    };
    ws.onerror = () => {
      // The close event that follows says what happened.
    };
    this._setTimer("connect", this._connectTimeoutMs, () => this._drop("connect_timeout"));
    this._setState("connecting", { attempt: this._attempt });
  }

  /** Forgets the socket (its late events are ignored) and returns it. */
  _detach() {
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
    }
    return ws;
  }

  /** Gives up on a socket that stopped answering, without waiting for its close. */
  _drop(reason) {
    const ws = this._detach();
    if (!ws) return;
    try {
      ws.close(4000, reason);
    } catch {
      // Nothing to do: the socket is gone either way.
    }
    this._afterClose({ code: 4000, reason });
  }

  _afterClose({ code, reason }) {
    this._clearTimers();
    const wasWelcomed = this._welcome !== null;
    this._welcome = null;
    for (const r of this._rooms.values()) r.joined = false;
    for (const [id, s] of this._sends) {
      this._clearTimeout(s.timer);
      s.reject(new SecureChatError("disconnected", "the connection closed before the server answered", { ref: id, room: s.room }));
    }
    this._sends.clear();
    const fifo = this._fifo;
    this._fifo = [];
    this._spentBarriers.clear();
    this._leaving.clear();
    for (const entry of fifo) {
      if (entry.kind === "leave") entry.resolve();
      else if (entry.kind === "refresh") entry.reject(new SecureChatError("disconnected", "the connection closed before the refresh was answered"));
      else if (entry.kind === "barrier") entry.reject(new SecureChatError("disconnected", "the connection closed: the outcome is unknown", { room: entry.room }));
      // Joins wait for the next connection.
    }
    this._emit("disconnect", { code, reason, wasLive: wasWelcomed });
    if (this._closing) {
      this._setState("closed", { code, reason });
    } else if (code === 4001) {
      this._expired({ code, reason });
    } else if (code === 4003) {
      this._closing = true;
      for (const r of this._rooms.values()) this._rejectWaiters(r, new SecureChatError("closed", "removed by the server"));
      this._setState("closed", { code, reason });
    } else {
      this._scheduleReconnect({ code, reason });
    }
  }

  _scheduleReconnect(info) {
    const delayMs = backoffDelay(this._attempt, this._reconnect, this._random);
    this._attempt += 1;
    this._setTimer("reconnect", delayMs, () => this._open());
    this._setState("reconnecting", { ...info, attempt: this._attempt, delayMs, retryAt: this._now() + delayMs });
  }

  /** The token expired: get a new one from the app, or stop. */
  _expired(info) {
    if (!this._refreshToken) {
      this._setState("expired", info);
      return;
    }
    if (this._reauthenticating) return;
    this._reauthenticating = true;
    this._setState("connecting", { ...info, refreshing: true, attempt: this._attempt });
    this._obtainToken().then(
      (token) => {
        this._reauthenticating = false;
        if (this._closing) return;
        if (this._cookieAuth) {
          // The callback renewed the cookie; the browser sends it.
          this._open();
          return;
        }
        const expiry = tokenExpiry(token);
        if (expiry !== null && expiry <= this._now()) {
          this._setState("expired", { ...info, reason: "refresh_returned_expired_token" });
          return;
        }
        this._token = token;
        this._open();
      },
      (e) => {
        this._reauthenticating = false;
        if (this._closing) return;
        this._emit("error", { code: "refresh_failed", message: String(e?.message ?? e) });
        this._setState("expired", info);
      },
    );
  }

  async _obtainToken() {
    const token = await this._refreshToken();
    if (typeof token === "string" && token !== "") return token;
    if (this._cookieAuth) return null;
    throw new Error("the refresh callback returned no token");
  }

  async _autoRefresh() {
    if (!this._refreshToken || this._refreshing) return;
    this._refreshing = true;
    try {
      const token = await this._obtainToken();
      this._refreshing = false;
      // With cookies and no token returned, the renewed cookie is used at
      // the next connection (after close 4001, rooms are joined again).
      if (token === null) return;
      if (this._live()) await this.refresh(token);
      else this._token = token;
    } catch (e) {
      this._refreshing = false;
      this._emit("error", { code: e?.code ?? "refresh_failed", message: String(e?.message ?? e) });
    }
  }

  // --- timers --------------------------------------------------------------

  _setTimer(name, ms, fn) {
    this._clearTimer(name);
    const id = this._setTimeout(() => {
      if (this._timers.get(name) === id) this._timers.delete(name);
      fn();
    }, ms);
    this._timers.set(name, id);
  }
  _clearTimer(name) {
    if (this._timers.has(name)) {
      this._clearTimeout(this._timers.get(name));
      this._timers.delete(name);
    }
  }
  _clearTimers() {
    for (const name of [...this._timers.keys()]) if (name !== "reconnect") this._clearTimer(name);
  }

  _schedulePing() {
    this._setTimer("ping", this._pingIntervalMs, () => {
      if (!this._live()) return;
      this._write({ type: "ping", id: this._nextId(LIVE_PING) });
      if (!this._timers.has("pingTimeout")) {
        this._setTimer("pingTimeout", this._pingTimeoutMs, () => this._drop("ping_timeout"));
      }
      this._schedulePing();
    });
  }

  // --- writing -------------------------------------------------------------

  _nextId(prefix) {
    this._counter += 1;
    return `${prefix}${this._prefix}-${this._counter}`;
  }
  _write(frame) {
    this._writeRaw(JSON.stringify(frame));
  }
  _writeRaw(text) {
    try {
      this._ws?.send(text);
    } catch {
      // A socket that cannot send is about to close; its close event
      // rejects what is pending.
    }
  }
  _sendJoin(room, r) {
    const frame = { type: "join", room };
    if (r.lastSeq !== null) {
      frame.since = r.lastSeq;
      // The seq counts within this epoch; a server whose room restarted
      // since replays everything it holds instead of trusting `since`.
      if (r.epoch) frame.epoch = r.epoch;
    }
    this._fifo.push({ kind: "join", room, since: r.lastSeq });
    this._write(frame);
  }
  _rejectWaiters(r, error) {
    const waiters = r.waiters;
    r.waiters = [];
    for (const w of waiters) w.reject(error);
  }

  // --- reading -------------------------------------------------------------

  _invalid(reason, raw) {
    const text = typeof raw === "string" ? raw : raw == null ? "" : `[${Object.prototype.toString.call(raw)}]`;
    this._emit("invalid", { reason, frame: text.length > 256 ? `${text.slice(0, 256)}…` : text });
  }

  _onFrame(data) {
    // Any frame is a sign of life.
    this._clearTimer("pingTimeout");
    if (typeof data !== "string") {
      this._invalid("binary frame", data);
      return;
    }
    const { frame, error } = parseServerFrame(data);
    if (error) {
      this._invalid(error, data);
      return;
    }
    if (!this._welcome && frame.type !== "welcome") {
      this._invalid(`${frame.type} before welcome`, data);
      return;
    }
    const handler = this[`_on_${frame.type}`];
    const problem = handler.call(this, frame);
    if (problem) this._invalid(problem, data);
  }

  _on_welcome(f) {
    if (this._welcome) return "a second welcome";
    this._welcome = f;
    this._clearTimer("connect");
    this._setTimer("stable", this._reconnect.stableAfterMs, () => {
      this._attempt = 0;
    });
    this._emit("welcome", { session: f.session, user: this.user, expires_at: f.expires_at, limits: { ...f.limits } });
    this._setState("live", { attempt: this._attempt });
    this._schedulePing();
    for (const [room, r] of this._rooms) this._sendJoin(room, r);
    return null;
  }

  _takeFifo(predicate) {
    const index = this._fifo.findIndex(predicate);
    if (index < 0) return null;
    return this._fifo.splice(index, 1)[0];
  }

  _on_joined(f) {
    const entry = this._takeFifo((e) => e.kind === "join" && e.room === f.room);
    if (!entry) return "joined for a room not being joined";
    const r = this._rooms.get(f.room);
    if (!r) {
      // Left while the join was on its way; the leave follows.
      return null;
    }
    r.joined = true;
    if (f.e2e === true) r.e2e = true;
    const epochChanged = Boolean(r.epoch && f.epoch && f.epoch !== r.epoch);
    if (f.epoch) r.epoch = f.epoch;
    const since = entry.since;
    let gap = null;
    if (since === null) {
      r.lastSeq = f.seq;
    } else if (f.seq < since || epochChanged) {
      // The room's sequence restarted (the server lost its history).
      r.lastSeq = 0;
      gap = { room: f.room, since, seq: f.seq, restarted: true };
    } else if (!f.recovered) {
      gap = { room: f.room, since, seq: f.seq, restarted: false };
    }
    const info = { room: f.room, seq: f.seq, recovered: f.recovered, rejoined: since !== null, e2e: r.e2e };
    this._emit("joined", info);
    if (gap) this._emit("gap", gap);
    const waiters = r.waiters;
    r.waiters = [];
    for (const w of waiters) w.resolve({ room: f.room, seq: f.seq, recovered: f.recovered });
    return null;
  }

  _on_left(f) {
    const entry = f.reason === "left" ? this._takeFifo((e) => e.kind === "leave" && e.room === f.room) : null;
    if (entry) {
      this._leaving.delete(f.room);
      entry.resolve();
      this._emit("left", { room: f.room, reason: f.reason });
      return null;
    }
    const r = this._rooms.get(f.room);
    if (!r || !r.joined) return `left for a room not joined`;
    this._rooms.delete(f.room);
    this._emit("left", { room: f.room, reason: f.reason });
    return null;
  }

  _on_message(f) {
    const r = this._rooms.get(f.room);
    if (!r && this._leaving.has(f.room)) return null;
    if (!r || !r.joined) return "message for a room not joined";
    if (r.lastSeq !== null && f.seq <= r.lastSeq) return `duplicate or out-of-order seq ${f.seq}`;
    r.lastSeq = f.seq;
    // The server relays `enc` only in end-to-end rooms.
    if (f.enc) r.e2e = true;
    this._emit("message", f);
    return null;
  }

  _on_ack(f) {
    const pending = this._sends.get(f.id);
    if (!pending) return "ack for no pending send";
    if (pending.room !== f.room) return "ack for another room";
    this._sends.delete(f.id);
    this._clearTimeout(pending.timer);
    pending.resolve({ id: f.id, room: f.room, seq: f.seq });
    return null;
  }

  _on_deleted(f) {
    const r = this._rooms.get(f.room);
    if (!r && this._leaving.has(f.room)) return null;
    if (!r || !r.joined) return "deleted for a room not joined";
    this._emit("deleted", f);
    return null;
  }

  _on_refreshed(f) {
    const entry = this._takeFifo((e) => e.kind === "refresh");
    if (!entry) return "refreshed without a refresh";
    this._token = entry.token;
    this._welcome = { ...this._welcome, expires_at: f.expires_at };
    entry.resolve({ expires_at: f.expires_at });
    this._emit("refreshed", { expires_at: f.expires_at });
    return null;
  }

  _on_session_expiring(f) {
    this._emit("expiring", { expires_at: f.expires_at, refreshing: this._refreshToken !== null });
    this._autoRefresh();
    return null;
  }

  _on_pong(f) {
    if (f.id?.startsWith(BARRIER)) {
      if (this._spentBarriers.delete(f.id)) return null;
      const entry = this._takeFifo((e) => e.kind === "barrier" && e.id === f.id);
      if (!entry) return "pong for no pending request";
      entry.resolve();
      return null;
    }
    if (f.id === undefined || f.id.startsWith(LIVE_PING)) return null;
    return "pong for no ping";
  }

  _on_error(f) {
    const err = (details) => new SecureChatError(f.code, f.message, details);
    if (f.ref !== undefined) {
      const pending = this._sends.get(f.ref);
      if (pending) {
        this._sends.delete(f.ref);
        this._clearTimeout(pending.timer);
        if (f.code === "encrypted_room") this.markEncrypted(pending.room);
        pending.reject(err({ ref: f.ref, room: pending.room }));
        return null;
      }
      if (f.ref.startsWith(LIVE_PING)) return null;
      if (f.ref.startsWith(BARRIER)) {
        // The ping behind a delete or kick was refused (rate limit): the
        // outcome of the request itself is unknown.
        const entry = this._takeFifo((e) => e.kind === "barrier" && e.id === f.ref);
        if (entry) entry.reject(err({ ref: f.ref, room: entry.room }));
        return null;
      }
      this._emit("error", { code: f.code, message: f.message, ref: f.ref });
      return null;
    }
    // No `ref`: the answer to the oldest request without an id.
    const entry = this._fifo.shift();
    if (!entry) {
      this._emit("error", { code: f.code, message: f.message });
      return null;
    }
    if (entry.kind === "join") {
      const r = this._rooms.get(entry.room);
      if (r && f.code === "rate_limited") {
        // Not refused, only too fast: ask again in a moment.
        this._setTimer(`join:${entry.room}`, this._reconnect.initialDelayMs * 2, () => {
          const again = this._rooms.get(entry.room);
          if (again && !again.joined && this._live()) this._sendJoin(entry.room, again);
        });
      } else if (r) {
        this._rooms.delete(entry.room);
        const error = err({ room: entry.room });
        if (r.waiters.length) this._rejectWaiters(r, error);
        else this._emit("left", { room: entry.room, reason: "refused", error: { code: f.code, message: f.message } });
      }
    } else if (entry.kind === "barrier") {
      this._spentBarriers.add(entry.id);
      entry.reject(err({ room: entry.room }));
    } else {
      entry.reject(err({ room: entry.room }));
    }
    return null;
  }
}

// ---------------------------------------------------------------------------
// End-to-end encryption (WebCrypto). The server relays `enc` without reading
// it; see docs/client.md for what this protects and what it does not.

const E2E = "securechat.e2e.v1";
/** PBKDF2-SHA-256 iterations for passphrase keys (OWASP's 2023 figure). */
export const PBKDF2_ITERATIONS = 600_000;

function subtle() {
  const s = globalThis.crypto?.subtle;
  if (!s) throw new SecureChatError("unsupported", "WebCrypto is not available (a secure context is required)");
  return s;
}
function utf8(text) {
  return new TextEncoder().encode(text);
}
function hex(bytes) {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}
/** Standard base64 of bytes. */
export function toBase64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}
/** Bytes of standard base64 (padding optional). */
export function fromBase64(text) {
  const padded = text + "=".repeat((4 - (text.length % 4)) % 4);
  const s = atob(padded);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/**
 * A room key from a passphrase the members share out of band:
 * PBKDF2-SHA-256 over the passphrase (NFC), salted with the room name, 512
 * bits: the first 256 are the AES-256-GCM key (not extractable), the next 64
 * name it (`kid`), so a member with another passphrase knows at once that
 * it cannot decrypt.
 */
export async function deriveRoomKey(passphrase, room, { iterations = PBKDF2_ITERATIONS } = {}) {
  if (typeof passphrase !== "string" || passphrase === "") throw new SecureChatError("invalid_key", "the passphrase is empty");
  if (!isRoomName(room)) throw new SecureChatError("invalid_key", "not a valid room name");
  const s = subtle();
  const material = await s.importKey("raw", utf8(passphrase.normalize("NFC")), "PBKDF2", false, ["deriveBits"]);
  const salt = utf8(`${E2E}\u0000pbkdf2\u0000${room}`);
  const bits = new Uint8Array(await s.deriveBits({ name: "PBKDF2", hash: "SHA-256", salt, iterations }, material, 512));
  const key = await s.importKey("raw", bits.slice(0, 32), { name: "AES-GCM" }, false, ["encrypt", "decrypt"]);
  const kid = `p-${hex(bits.slice(32, 40))}`;
  bits.fill(0);
  return { room, kid, key };
}

/** A room key from 32 raw bytes (a Uint8Array or standard base64). */
export async function importRoomKey(raw, room) {
  if (!isRoomName(room)) throw new SecureChatError("invalid_key", "not a valid room name");
  let bytes;
  try {
    bytes = typeof raw === "string" ? fromBase64(raw.trim()) : new Uint8Array(raw);
  } catch {
    throw new SecureChatError("invalid_key", "the key is not valid base64");
  }
  if (bytes.length !== 32) throw new SecureChatError("invalid_key", "a room key is 32 bytes (44 characters of base64)");
  const s = subtle();
  const digest = new Uint8Array(await s.digest("SHA-256", new Uint8Array([...utf8(`${E2E}\u0000kid\u0000`), ...bytes])));
  const key = await s.importKey("raw", bytes, { name: "AES-GCM" }, false, ["encrypt", "decrypt"]);
  return { room, kid: `k-${hex(digest.slice(0, 8))}`, key };
}

/** 32 random bytes in base64: a fresh key to share for {@link importRoomKey}. */
export function generateRawRoomKey() {
  return toBase64(globalThis.crypto.getRandomValues(new Uint8Array(32)));
}

function additionalData(room, sender, kid) {
  // Room names and user ids hold no NUL, so this encoding is unambiguous.
  return utf8(`${E2E}\u0000${room}\u0000${sender}\u0000${kid}`);
}

/**
 * Encrypts `text` for the room of `roomKey` as `sender` (the `sub` the
 * server will stamp on the message, from `welcome.user.sub`). Returns the
 * `enc` payload to pass to {@link SecureChat#sendEncrypted}.
 */
export async function encryptMessage(roomKey, sender, text) {
  const iv = globalThis.crypto.getRandomValues(new Uint8Array(12));
  const ct = await subtle().encrypt(
    { name: "AES-GCM", iv, additionalData: additionalData(roomKey.room, sender, roomKey.kid), tagLength: 128 },
    roomKey.key,
    utf8(text),
  );
  return { alg: "A256GCM", kid: roomKey.kid, iv: toBase64(iv), ct: toBase64(new Uint8Array(ct)) };
}

/**
 * Decrypts a received `message` with `enc` (its `room` and `from.sub` are
 * checked as additional data). Rejects with `cannot_decrypt` for another
 * key, a tampered payload, or a message moved to another room or sender.
 */
export async function decryptMessage(roomKey, message) {
  const enc = validEnc(message?.enc);
  if (!enc || !roomKey || message.room !== roomKey.room || enc.kid !== roomKey.kid) {
    throw new SecureChatError("cannot_decrypt", "cannot decrypt", { room: message?.room });
  }
  try {
    const plain = await subtle().decrypt(
      { name: "AES-GCM", iv: fromBase64(enc.iv), additionalData: additionalData(message.room, message.from.sub, enc.kid), tagLength: 128 },
      roomKey.key,
      fromBase64(enc.ct),
    );
    return new TextDecoder("utf-8", { fatal: true }).decode(plain);
  } catch {
    throw new SecureChatError("cannot_decrypt", "cannot decrypt", { room: message.room });
  }
}
