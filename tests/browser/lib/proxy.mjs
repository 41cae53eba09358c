// A TCP relay between one browser and the server that the test can cut:
// `cut()` drops every connection through it and refuses new ones until
// `restore()`, as a network outage would for that browser only.

import { connect, createServer } from "node:net";

export async function startProxy() {
  const sockets = new Set();
  let blocked = false;
  const proxy = {
    port: 0,
    /** The server port to relay to. */
    target: 0,
    /** Connections relayed so far. */
    accepted: 0,
    cut() {
      blocked = true;
      for (const socket of sockets) socket.destroy();
      sockets.clear();
    },
    restore() {
      blocked = false;
    },
    close() {
      proxy.cut();
      return new Promise((done) => server.close(() => done()));
    },
  };
  const server = createServer((client) => {
    if (blocked || !proxy.target) {
      client.destroy();
      return;
    }
    proxy.accepted += 1;
    const upstream = connect(proxy.target, "127.0.0.1");
    sockets.add(client);
    sockets.add(upstream);
    const end = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("error", end);
    upstream.on("error", end);
    client.on("close", end);
    upstream.on("close", end);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((done, fail) => {
    server.once("error", fail);
    server.listen(0, "127.0.0.1", done);
  });
  proxy.port = server.address().port;
  return proxy;
}
