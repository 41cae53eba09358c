// Types for securechat.js, the securechat client library (an ES module with
// no dependencies). The wire protocol is described in docs/protocol.md; how
// to embed the library, in docs/client.md.

/** The subprotocol every connection offers: `"securechat.v1"`. */
export const PROTOCOL: "securechat.v1";
/** The prefix of the subprotocol entry that carries the token. */
export const BEARER_PREFIX: "securechat.bearer.";
/** PBKDF2-SHA-256 iterations used by {@link deriveRoomKey}. */
export const PBKDF2_ITERATIONS: number;

export interface ReconnectOptions {
  /** First delay step (default 500 ms). */
  initialDelayMs?: number;
  /** Largest delay step (default 30 000 ms). */
  maxDelayMs?: number;
  /** Growth of the step per failed attempt (default 2). */
  factor?: number;
  /** A connection that stays live this long resets the backoff (default 10 000 ms). */
  stableAfterMs?: number;
}

export const DEFAULTS: Readonly<{
  reconnect: Readonly<Required<ReconnectOptions>>;
  pingIntervalMs: number;
  pingTimeoutMs: number;
  connectTimeoutMs: number;
  sendTimeoutMs: number;
}>;

/** A constructor compatible with the browser's `WebSocket`. */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string, protocols: string[]) => WebSocketLike;

export interface SecureChatOptions {
  /** `wss://host:port/ws`; default: the `/ws` of the page's own origin. */
  url?: string;
  /** The JWT. Can also be given later with {@link SecureChat.setToken}. */
  token?: string | null;
  /**
   * The server takes the token from its `securechat_token` cookie
   * (`auth.cookie = true`, HttpOnly, set by your login): no token is sent
   * in the subprotocol. `refreshToken` then renews the cookie; if it returns
   * a token, that token is also sent with `refresh`.
   */
  cookieAuth?: boolean;
  /**
   * Returns a new token for the same user. Called when the server sends
   * `session_expiring` (the new token is sent with `refresh`) and when the
   * token has expired before a reconnection. Without it the client goes to
   * state `expired` and the app must ask the user.
   */
  refreshToken?: () => Promise<string | void> | string | void;
  reconnect?: ReconnectOptions;
  /** How often the protocol's `ping` is sent while live (default 20 000 ms). */
  pingIntervalMs?: number;
  /** No frame at all this long after a ping: the connection is dropped (default 10 000 ms). */
  pingTimeoutMs?: number;
  /** No `welcome` this long after opening: the attempt is dropped (default 15 000 ms). */
  connectTimeoutMs?: number;
  /** A send not answered this long is rejected with `timeout` (default 30 000 ms). */
  sendTimeoutMs?: number;
  /** For tests: the WebSocket implementation, timers, randomness and clock. */
  WebSocket?: WebSocketConstructor;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (id: unknown) => void;
  random?: () => number;
  now?: () => number;
}

export type ConnectionState = "idle" | "connecting" | "live" | "reconnecting" | "expired" | "closed";

export interface User {
  sub: string;
  name: string;
  roles: string[];
}

export interface Sender {
  sub: string;
  name: string;
}

/** An end-to-end encrypted payload; all binary fields are standard base64. */
export interface Enc {
  alg: "A256GCM";
  /** Which room key encrypted it (1 to 64 characters). */
  kid: string;
  /** 12 bytes. */
  iv: string;
  /** Ciphertext with its 16-byte GCM tag appended. */
  ct: string;
}

/** A room message; exactly one of `body` and `enc` is set. */
export interface Message {
  type: "message";
  room: string;
  seq: number;
  /** The server's id for the message. */
  id: string;
  /** Stamped by the server from the sender's token. */
  from: Sender;
  body?: string;
  enc?: Enc;
  /** When the server accepted it (RFC 3339). */
  ts: string;
}

export interface Ack {
  /** The client id of the send. */
  id: string;
  room: string;
  seq: number;
}

export interface JoinResult {
  room: string;
  /** The room's latest seq when joined. */
  seq: number;
  /** Whether every message after `since` was replayed. */
  recovered: boolean;
}

export interface StateEvent {
  state: ConnectionState;
  previous: ConnectionState;
  /** Reconnect attempts since the connection was last stable. */
  attempt?: number;
  /** `reconnecting`: the delay chosen, and when the next attempt starts (ms since the epoch). */
  delayMs?: number;
  retryAt?: number;
  /** The close code and reason that led here, when there was one. */
  code?: number | null;
  reason?: string;
  /** `connecting`: a new token is being fetched from `refreshToken`. */
  refreshing?: boolean;
}

export interface EventMap {
  state: StateEvent;
  welcome: { session: string; user: User; expires_at: string; limits: { max_message_bytes: number; rate_per_sec: number; burst: number } };
  /** A room was joined; `rejoined` after a reconnection (sent with `since`). */
  joined: JoinResult & { rejoined: boolean; e2e: boolean };
  /**
   * The client is no longer in a room: `reason` is `left` (asked for),
   * `kicked` (by a moderator), or `refused` (joining again after a
   * reconnection was refused; `error` says why).
   */
  left: { room: string; reason: string; error?: { code: string; message: string } };
  /**
   * Messages may be missing in `room` after a reconnection: the server
   * could not replay everything after `since`. `restarted`: the room's seq
   * went backwards (the server lost its history), so seqs seen before no
   * longer name the same messages.
   */
  gap: { room: string; since: number; seq: number; restarted: boolean };
  message: Message;
  deleted: { type: "deleted"; room: string; seq: number; by: string };
  /** `session_expiring` arrived; `refreshing` when `refreshToken` is being called. */
  expiring: { expires_at: string; refreshing: boolean };
  refreshed: { expires_at: string };
  /** An error from the server that answers no pending request, or a failed refresh. */
  error: { code: string; message: string; ref?: string };
  /** A frame from the server was malformed or unexpected, and was dropped. */
  invalid: { reason: string; frame: string };
  /** The socket closed (a `state` event follows). */
  disconnect: { code: number | null; reason: string; wasLive: boolean };
}

export class SecureChatError extends Error {
  constructor(code: string, message?: string, details?: { ref?: string; room?: string });
  /**
   * The server's error code (`invalid_message`, `forbidden`, `encrypted_room`,
   * `rate_limited`, ...) or the client's own: `disconnected` (the connection
   * closed before the answer: the outcome is unknown), `not_connected`,
   * `not_joined`, `too_large`, `timeout`, `closed`, `left`, `cannot_decrypt`,
   * `invalid_key`.
   */
  code: string;
  ref?: string;
  room?: string;
}

export class SecureChat {
  constructor(options?: SecureChatOptions);
  readonly state: ConnectionState;
  /** The user named in `welcome`, or null before it. */
  readonly user: User | null;
  readonly limits: { max_message_bytes: number; rate_per_sec: number; burst: number } | null;
  /** The rooms joined, or to be joined again after a reconnection. */
  readonly rooms: string[];
  /** The last seq seen in `room` (sent as `since` when joining again). */
  lastSeq(room: string): number | null;
  /** Whether `room` is known to be end-to-end encrypted: `send` then refuses plain text before it leaves. */
  isEncrypted(room: string): boolean;
  /**
   * Marks `room` as end-to-end encrypted. The server does not announce it,
   * so the app says so (the library also learns it from an `encrypted_room`
   * error or an `enc` message, and from `joined.e2e` if a server sends it).
   */
  markEncrypted(room: string): void;

  on<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): void;

  setToken(token: string): void;
  connect(): void;
  /** While `reconnecting`, tries at once. */
  reconnectNow(): void;
  close(): void;

  /**
   * Resolves once joined (waiting for a connection if needed); rejects with
   * the server's error. `e2e`: the room is end-to-end encrypted (see
   * markEncrypted); `since`: the last seq already seen, to replay from.
   */
  join(room: string, options?: { since?: number; e2e?: boolean }): Promise<JoinResult>;
  leave(room: string): Promise<void>;
  /**
   * Resolves with the server's `ack`; rejects with its `error` (same `ref`)
   * or `disconnected`. In a room known to be encrypted, plain text is
   * refused here (`encrypted_room`) and never sent.
   */
  send(room: string, body: string): Promise<Ack>;
  sendEncrypted(room: string, enc: Enc): Promise<Ack>;
  /** Author or moderator. Resolves when the server has carried it out. */
  delete(room: string, seq: number): Promise<void>;
  /** Moderators. */
  kick(room: string, user: string): Promise<void>;
  /** Replaces the session's token (same user) on the open connection. */
  refresh(token: string): Promise<{ expires_at: string | null }>;
}

/** The delay before reconnect attempt `attempt` (0-based): uniformly in [step/2, step], step = min(max, initial * factor^attempt). */
export function backoffDelay(attempt: number, options?: ReconnectOptions, random?: () => number): number;
/** `wss://<this page's host>/ws`. */
export function defaultUrl(location?: { href: string }, path?: string): string;
/** A JWT's `exp` in ms (not verified), or null. */
export function tokenExpiry(token: string): number | null;
export function isRoomName(name: unknown): name is string;
/** Validates one frame from the server; returns a clean copy or the reason it was refused. */
export function parseServerFrame(text: unknown): { frame: { type: string; [field: string]: unknown }; error?: undefined } | { frame?: undefined; error: string };
export function validEnc(enc: unknown): Enc | null;

/** A room key: AES-256-GCM, bound to one room, named by `kid`. */
export interface RoomKey {
  room: string;
  kid: string;
  key: CryptoKey;
}
/** PBKDF2-SHA-256 (salt bound to the room name) from a shared passphrase. */
export function deriveRoomKey(passphrase: string, room: string, options?: { iterations?: number }): Promise<RoomKey>;
/** A room key from 32 raw bytes (Uint8Array or standard base64). */
export function importRoomKey(raw: Uint8Array | ArrayBuffer | string, room: string): Promise<RoomKey>;
/** 32 random bytes in base64, to share as a room key. */
export function generateRawRoomKey(): string;
/** Encrypts `text` as `sender` (the sender's `welcome.user.sub`): random 96-bit IV; room, sender and kid as additional data. */
export function encryptMessage(key: RoomKey, sender: string, text: string): Promise<Enc>;
/** Decrypts a received message; rejects with `cannot_decrypt` (wrong key, tampering, other room or sender). */
export function decryptMessage(key: RoomKey, message: Pick<Message, "room" | "from" | "enc">): Promise<string>;
export function toBase64(bytes: Uint8Array): string;
export function fromBase64(text: string): Uint8Array;
