// The Node `ws` server as its README's tutorial writes it: an https server,
// a WebSocketServer on it, every message broadcast to every open client
// ("External HTTP/S server" + "Server broadcast"). Only the certificate
// paths and the port come from the environment, so the bench can start it.
import { createServer } from 'https';
import { readFileSync } from 'fs';
import { WebSocketServer, WebSocket } from 'ws';

const server = createServer({
  cert: readFileSync(process.env.CERT),
  key: readFileSync(process.env.KEY)
});
const wss = new WebSocketServer({ server });

wss.on('connection', function connection(ws) {
  ws.on('error', console.error);

  ws.on('message', function message(data, isBinary) {
    wss.clients.forEach(function each(client) {
      if (client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    });
  });
});

server.listen(Number(process.env.PORT), '127.0.0.1');
