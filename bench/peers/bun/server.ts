// Bun's built-in WebSocket pub/sub (uWebSockets inside), as its docs write
// it: every socket subscribes to one topic, every message is published to
// the topic. Only the certificate paths and the port come from the
// environment, so the bench can start it.
const server = Bun.serve({
  hostname: "127.0.0.1",
  port: Number(process.env.PORT),
  tls: {
    cert: Bun.file(process.env.CERT!),
    key: Bun.file(process.env.KEY!),
  },
  fetch(req, server) {
    if (server.upgrade(req)) return;
    return new Response("Upgrade failed", { status: 400 });
  },
  websocket: {
    open(ws) {
      ws.subscribe("bench");
    },
    message(ws, message) {
      server.publish("bench", message);
    },
  },
});
