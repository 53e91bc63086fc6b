// A complete exchange-relay client for Node.js: subscribe, print what arrives, answer errors,
// reconnect with backoff when the connection drops.
//
//   cd examples && npm ci
//   node client.mjs                          # ws://localhost:3000/ws, 20 messages
//   node client.mjs ws://relay:3000/ws 100
//
// In a browser the same code works with the built-in WebSocket instead of the `ws` package.
import WebSocket from "ws";

const url = process.argv[2] ?? "ws://localhost:3000/ws";
const count = Number(process.argv[3] ?? 20);
const channels = ["ticker:BTCUSDT", "depth:BTCUSDT:5", "trades:ETHUSD@kraken"];

let seen = 0;
let retryMs = 500;

function describe(msg) {
  const d = msg.data;
  switch (msg.type) {
    case "ticker":
      return `${msg.channel}: ${d.price} bid ${d.bid} ask ${d.ask}`;
    case "depth":
      return `${msg.channel}: best bid ${d.bids[0]?.join(" x ")} best ask ${d.asks[0]?.join(" x ")}`;
    case "trade":
      return `${msg.channel}: ${d.side} ${d.quantity} @ ${d.price}`;
    default:
      return `${msg.channel}: ${msg.type} ${JSON.stringify(d)}`;
  }
}

function connect() {
  const ws = new WebSocket(url);
  ws.on("open", () => {
    retryMs = 500;
    ws.send(JSON.stringify({ type: "subscribe", channels, id: 1 }));
  });
  ws.on("message", (raw) => {
    const msg = JSON.parse(raw.toString());
    if (msg.type === "connected") {
      console.log(`connected as ${msg.data.clientId}`);
    } else if (msg.type === "subscribed") {
      console.log(`subscribed to ${msg.channel}`);
    } else if (msg.type === "error") {
      console.log(`error on ${msg.channel}: ${msg.data.code}: ${msg.data.message}`);
    } else if (msg.data !== undefined) {
      console.log(describe(msg));
      seen += 1;
      if (seen >= count) ws.close(1000);
    }
  });
  ws.on("close", (code) => {
    if (seen >= count) return;
    console.log(`closed (${code}); reconnecting in ${retryMs} ms`);
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 30_000);
  });
  ws.on("error", (err) => console.log(`connection error: ${err.message}`));
}

connect();
