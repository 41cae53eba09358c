// Starts the real securechat binary for the browser tests: its own
// certificates (gen-cert), HS256 secret, configuration and port, tokens
// minted with the `token` subcommand, stopped with SIGTERM.

import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);

export const ROOT = fileURLToPath(new URL("../../../", import.meta.url));
export const BIN = resolve(ROOT, process.env.SECURECHAT_BIN ?? "target/debug/securechat");
export const ARTIFACTS = join(ROOT, "target", "browser-artifacts");

/** A TCP port on 127.0.0.1 that was free a moment ago (reused across a restart). */
export function freePort() {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]);
}

/** The environment without settings that would change the server's logs. */
function serverEnv() {
  const env = { ...process.env };
  delete env.SECURECHAT_LOG;
  delete env.SECURECHAT_JWT_SECRET;
  return env;
}

export class TestServer {
  /**
   * extraOrigins: more allowed origins (besides the server's own);
   * extraConfig: TOML appended to the configuration.
   */
  static async create({ extraOrigins = [], extraConfig = "" } = {}) {
    const dir = await mkdtemp(join(tmpdir(), "securechat-browser-"));
    const server = new TestServer(dir, await freePort());
    await run(BIN, ["gen-cert", "--hosts", "localhost,127.0.0.1", "--out", join(dir, "certs")]);
    await writeFile(join(dir, "jwt.secret"), randomBytes(32).toString("hex"), { mode: 0o600 });
    const origins = [server.origin, `https://127.0.0.1:${server.port}`, ...extraOrigins];
    await writeFile(server.configPath, server.#config(origins, extraConfig));
    await server.start();
    return server;
  }

  constructor(dir, port) {
    this.dir = dir;
    this.port = port;
    this.configPath = join(dir, "securechat.toml");
    this.origin = `https://localhost:${port}`;
    this.wsUrl = `wss://localhost:${port}/ws`;
    /** Every log line of every run, for failure reports. */
    this.logs = [];
    this.child = null;
  }

  #config(origins, extra) {
    return `
[server]
listen = "127.0.0.1:${this.port}"
handshake_timeout_ms = 5000
shutdown_grace_ms = 2000

[tls]
cert = "certs/server.crt"
key = "certs/server.key"

[auth]
leeway_secs = 5
[[auth.keys]]
kid = "main"
algorithm = "HS256"
secret_file = "jwt.secret"

[security]
allowed_origins = ${JSON.stringify(origins)}

[metrics]
listen = "127.0.0.1:0"

[limits]
# Every browser, page and reconnection of the tests comes from 127.0.0.1.
handshake_rate_per_ip = 1000
handshake_burst_per_ip = 1000

[bans]
max_failures = 1000

[log]
format = "json"
level = "info"

[[rooms]]
name = "general"
history = 100

[[rooms]]
name = "secret-ops"
history = 100
e2e = true
${extra}
`;
  }

  /** Starts the binary and waits for its `server.listening` line. */
  async start() {
    if (this.child) throw new Error("already running");
    const child = spawn(BIN, ["serve", "--config", this.configPath], {
      cwd: this.dir,
      stdio: ["ignore", "pipe", "pipe"],
      env: serverEnv(),
    });
    this.child = child;
    child.exited = new Promise((done) => child.once("exit", (code, signal) => done({ code, signal })));
    const listening = new Promise((done, fail) => {
      const lines = createInterface({ input: child.stdout });
      lines.on("line", (line) => {
        this.logs.push(line);
        if (line.includes('"server.listening"')) done(JSON.parse(line));
      });
      createInterface({ input: child.stderr }).on("line", (line) => this.logs.push(line));
      child.once("exit", (code) => fail(new Error(`the server exited (${code}) before listening:\n${this.logs.join("\n")}`)));
      child.once("error", fail);
    });
    try {
      const line = await withTimeout(listening, 20_000, "server.listening");
      if (!String(line.addr).endsWith(`:${this.port}`)) throw new Error(`listening on ${line.addr}, not port ${this.port}`);
      return line;
    } catch (e) {
      // Never leave a server behind.
      this.child = null;
      child.kill("SIGKILL");
      throw e;
    }
  }

  /** SIGTERM, then waits for a clean exit (SIGKILL after 15 s). */
  async stop() {
    const child = this.child;
    if (!child) return null;
    this.child = null;
    child.kill("SIGTERM");
    try {
      return await withTimeout(child.exited, 15_000, "server exit after SIGTERM");
    } catch (e) {
      child.kill("SIGKILL");
      await child.exited;
      throw e;
    }
  }

  async restart() {
    const exit = await this.stop();
    await this.start();
    return exit;
  }

  /** A token minted by the binary's `token` subcommand with the configured key. */
  async token(sub, name, { roles = [], ttl = "1h" } = {}) {
    const args = ["token", "--config", this.configPath, "--sub", sub, "--ttl", ttl];
    if (name) args.push("--name", name);
    for (const role of roles) args.push("--role", role);
    const { stdout } = await run(BIN, args, { cwd: this.dir });
    return stdout.trim();
  }

  /** Stops the server (if running) and removes its folder. */
  async dispose() {
    try {
      await this.stop();
    } finally {
      await rm(this.dir, { recursive: true, force: true });
    }
  }
}
