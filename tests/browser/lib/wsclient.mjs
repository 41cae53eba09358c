// A minimal WebSocket client over node's TLS (RFC 6455, HTTP/1.1 upgrade),
// for what a browser cannot do in a test: see the HTTP status of a refused
// handshake, and observe a room's frames exactly as the server sends them.

import { randomBytes } from "node:crypto";
import { connect } from "node:tls";

/**
 * Opens a WebSocket to 127.0.0.1:`port` (SNI `localhost`, verified against
 * `ca`). Resolves with `{ status, headers, body }` for a refusal, or with a
 * `RawSocket` (status 101).
 */
export function rawConnect({ port, ca, token, origin, path = "/ws", timeoutMs = 10_000 }) {
  return new Promise((done, fail) => {
    const socket = connect({ host: "127.0.0.1", port, servername: "localhost", ca, ALPNProtocols: ["http/1.1"] });
    const timer = setTimeout(() => {
      socket.destroy();
      fail(new Error("handshake timed out"));
    }, timeoutMs);
    socket.once("error", (e) => {
      clearTimeout(timer);
      fail(e);
    });
    socket.once("secureConnect", () => {
      const headers = [
        `GET ${path} HTTP/1.1`,
        `Host: localhost:${port}`,
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        `Sec-WebSocket-Key: ${randomBytes(16).toString("base64")}`,
        "Sec-WebSocket-Protocol: securechat.v1",
      ];
      if (token) headers.push(`Authorization: Bearer ${token}`);
      if (origin) headers.push(`Origin: ${origin}`);
      socket.write(`${headers.join("\r\n")}\r\n\r\n`);
    });
    let buffer = Buffer.alloc(0);
    const onData = (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      const end = buffer.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = buffer.subarray(0, end).toString("latin1").split("\r\n");
      const status = Number(head[0].split(" ")[1]);
      const responseHeaders = Object.fromEntries(
        head.slice(1).map((line) => {
          const i = line.indexOf(":");
          return [line.slice(0, i).trim().toLowerCase(), line.slice(i + 1).trim()];
        }),
      );
      const rest = buffer.subarray(end + 4);
      if (status === 101) {
        socket.off("data", onData);
        clearTimeout(timer);
        done(new RawSocket(socket, rest, responseHeaders));
        return;
      }
      // A refusal: read the body until the server closes (Connection: close).
      socket.off("data", onData);
      let body = rest;
      socket.on("data", (more) => {
        body = Buffer.concat([body, more]);
      });
      socket.once("end", () => {
        clearTimeout(timer);
        done({ status, headers: responseHeaders, body: body.toString("utf8") });
      });
      socket.once("close", () => {
        clearTimeout(timer);
        done({ status, headers: responseHeaders, body: body.toString("utf8") });
      });
    };
    socket.on("data", onData);
  });
}

export class RawSocket {
  constructor(socket, initial, headers) {
    this.socket = socket;
    this.headers = headers;
    /** Every text frame received, as the server sent it. */
    this.texts = [];
    this.closed = null;
    this.buffer = Buffer.alloc(0);
    this.fragments = [];
    this.waiters = [];
    socket.on("data", (chunk) => this.#feed(chunk));
    socket.on("close", () => {
      this.closed ??= { code: 1006 };
      this.#wake();
    });
    socket.on("error", () => {});
    if (initial.length) this.#feed(initial);
  }

  #feed(chunk) {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    for (;;) {
      if (this.buffer.length < 2) return;
      const fin = (this.buffer[0] & 0x80) !== 0;
      const opcode = this.buffer[0] & 0x0f;
      let length = this.buffer[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (this.buffer.length < 4) return;
        length = this.buffer.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (this.buffer.length < 10) return;
        length = Number(this.buffer.readBigUInt64BE(2));
        offset = 10;
      }
      if (this.buffer.length < offset + length) return;
      const payload = this.buffer.subarray(offset, offset + length);
      this.buffer = this.buffer.subarray(offset + length);
      this.#frame(fin, opcode, Buffer.from(payload));
    }
  }

  #frame(fin, opcode, payload) {
    if (opcode === 0x9) {
      this.#write(0xa, payload);
    } else if (opcode === 0x8) {
      this.closed = { code: payload.length >= 2 ? payload.readUInt16BE(0) : 1005, reason: payload.subarray(2).toString() };
      this.#write(0x8, payload.subarray(0, 2));
      this.socket.end();
    } else if (opcode === 0x1 || opcode === 0x0) {
      this.fragments.push(payload);
      if (fin) {
        this.texts.push(Buffer.concat(this.fragments).toString("utf8"));
        this.fragments = [];
      }
    }
    this.#wake();
  }

  #write(opcode, payload) {
    const mask = randomBytes(4);
    const length = payload.length;
    const head =
      length < 126
        ? Buffer.from([0x80 | opcode, 0x80 | length])
        : Buffer.from([0x80 | opcode, 0x80 | 126, length >> 8, length & 0xff]);
    const masked = Buffer.from(payload);
    for (let i = 0; i < masked.length; i++) masked[i] ^= mask[i % 4];
    if (!this.socket.destroyed) this.socket.write(Buffer.concat([head, mask, masked]));
  }

  #wake() {
    for (const w of [...this.waiters]) w();
  }

  /** Parsed frames received so far. */
  get frames() {
    return this.texts.map((t) => JSON.parse(t));
  }

  send(frame) {
    this.#write(0x1, Buffer.from(typeof frame === "string" ? frame : JSON.stringify(frame)));
  }

  /** Waits for a received frame matching `predicate` (bounded). */
  next(predicate, timeoutMs = 10_000) {
    return new Promise((done, fail) => {
      const check = () => {
        const found = this.frames.find(predicate);
        if (found) {
          finish();
          done(found);
        } else if (this.closed) {
          finish();
          fail(new Error(`closed (${this.closed.code}) while waiting; got ${this.texts.join("\n")}`));
        }
      };
      const timer = setTimeout(() => {
        finish();
        fail(new Error(`no matching frame within ${timeoutMs} ms; got:\n${this.texts.join("\n")}`));
      }, timeoutMs);
      const finish = () => {
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== check);
      };
      this.waiters.push(check);
      check();
    });
  }

  close() {
    if (!this.socket.destroyed) {
      this.#write(0x8, Buffer.from([0x03, 0xe8]));
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 1000).unref();
    }
  }
}
