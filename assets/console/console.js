// exchange-relay console: plain JavaScript, no dependencies. Everything it shows comes from
// the relay it was loaded from: /ws for data, /api/v1/instruments for the picker,
// /api/v1/ws/stats and /health for the stats panel. The JWT is kept in this page's memory
// only, never stored.
"use strict";

const $ = (id) => document.getElementById(id);
const LOG_MAX = 500;
const CANDLES_MAX = 120;

const ui = {
  ws: null,
  nextId: 1,
  held: new Set(),
  lastSeq: new Map(),
  candles: new Map(), // open time -> candle, for the chart's channel
  chartChannel: null,
  bookChannel: null,
  logged: 0,
};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function setState(text, cls) {
  $("state").textContent = text;
  $("state").className = "state " + cls;
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const token = $("token").value.trim();
  const query = token ? "?token=" + encodeURIComponent(token) : "";
  return `${scheme}//${location.host}/ws${query}`;
}

function connect() {
  if (ui.ws) ui.ws.close(1000);
  setState("connecting", "connecting");
  const ws = new WebSocket(wsUrl());
  ui.ws = ws;
  ws.onopen = () => setState("open", "open");
  ws.onclose = (e) => {
    if (ui.ws === ws) {
      setState(`closed (${e.code}${e.reason ? " " + e.reason : ""})`, "closed");
      ui.held.clear();
      renderSubscriptions();
    }
  };
  ws.onerror = () => setState("connection error", "closed");
  ws.onmessage = (e) => onMessage(e.data);
}

function send(request) {
  if (!ui.ws || ui.ws.readyState !== WebSocket.OPEN) {
    notice("not connected: press Connect first");
    return;
  }
  request.id = ui.nextId++;
  ui.ws.send(JSON.stringify(request));
}

function notice(text, cls) {
  const n = el("p", text, cls || "notice");
  $("notices").prepend(n);
  while ($("notices").childElementCount > 20) $("notices").lastChild.remove();
}

function onMessage(text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch {
    notice("the relay sent something that is not JSON");
    return;
  }
  log(msg, text);
  switch (msg.type) {
    case "connected": {
      const d = msg.data;
      $("hello").textContent = `client ${d.clientId}, ${d.authenticated ? "user " + d.userId : "anonymous"}, up to ${d.maxSubscriptions} subscriptions`;
      break;
    }
    case "subscribed":
      ui.held.add(msg.channel);
      renderSubscriptions();
      break;
    case "unsubscribed":
      ui.held.delete(msg.channel);
      renderSubscriptions();
      break;
    case "error":
      notice(`${msg.channel ? msg.channel + ": " : ""}${msg.data.code}: ${msg.data.message}`, "error");
      break;
    case "gap":
      notice(`gap on ${msg.channel}: ${msg.data.reason} from ${msg.data.from} to ${msg.data.to}`, "gap");
      break;
    case "price":
    case "ticker":
      seq(msg);
      tickerRow(msg);
      break;
    case "depth":
      seq(msg);
      ladder(msg);
      break;
    case "kline":
      seq(msg);
      candle(msg);
      break;
    case "history":
      // A chart's candles before the live ones (the subscribe asked for them).
      ui.lastSeq.set(msg.channel, msg.seq);
      for (const k of msg.data) if (k.interval) candle({ channel: msg.channel, data: k });
      break;
    default:
      seq(msg);
  }
}

// Sequence numbers, where the relay sends them: a jump on a channel is made visible.
function seq(msg) {
  if (typeof msg.seq !== "number") return;
  const last = ui.lastSeq.get(msg.channel);
  if (last !== undefined && msg.seq !== last + 1) {
    notice(`${msg.channel}: seq ${last} -> ${msg.seq}`, "gap");
  }
  ui.lastSeq.set(msg.channel, msg.seq);
}

function log(msg, text) {
  ui.logged += 1;
  $("log-count").textContent = `${ui.logged} received`;
  if ($("pause").checked) return;
  const filter = $("filter").value.trim();
  if (filter && !text.includes(filter)) return;
  const item = el("li", text, "msg-" + msg.type);
  $("log").prepend(item);
  while ($("log").childElementCount > LOG_MAX) $("log").lastChild.remove();
}

function tickerRow(msg) {
  const d = msg.data;
  const id = "row-" + msg.channel;
  let row = document.getElementById(id);
  if (!row) {
    row = el("tr");
    row.id = id;
    $("tickers").tBodies[0].append(row);
  }
  const pct = msg.type === "price" ? d.changePercent24h : d.changePercent;
  const volume = msg.type === "price" ? d.volume24h : d.volume;
  const time = msg.type === "price" ? new Date(d.timestamp).toISOString() : d.timestamp;
  const cells = [msg.channel, d.price, d.bid ?? "", d.ask ?? "", pct ?? "", volume ?? "", time];
  row.replaceChildren(...cells.map((c) => el("td", String(c))));
}

function ladder(msg) {
  if (ui.bookChannel && ui.bookChannel !== msg.channel && ui.held.has(ui.bookChannel)) return;
  ui.bookChannel = msg.channel;
  $("book-channel").textContent = msg.channel;
  const { bids, asks } = msg.data;
  const rows = [];
  for (let i = 0; i < Math.max(bids.length, asks.length); i++) {
    const b = bids[i] || ["", ""];
    const a = asks[i] || ["", ""];
    const row = el("tr");
    row.append(el("td", String(b[1]), "bid"), el("td", String(b[0]), "bid"), el("td", String(a[0]), "ask"), el("td", String(a[1]), "ask"));
    rows.push(row);
  }
  $("ladder").tBodies[0].replaceChildren(...rows);
}

function candle(msg) {
  if (ui.chartChannel !== msg.channel) {
    if (ui.chartChannel && ui.held.has(ui.chartChannel)) return;
    ui.chartChannel = msg.channel;
    ui.candles.clear();
    $("chart-channel").textContent = msg.channel;
  }
  const k = msg.data;
  ui.candles.set(k.time, k);
  const times = [...ui.candles.keys()].sort((a, b) => a - b);
  while (times.length > CANDLES_MAX) ui.candles.delete(times.shift());
  drawChart();
}

function drawChart() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const list = [...ui.candles.values()].sort((a, b) => a.time - b.time);
  canvas.dataset.candles = String(list.length);
  if (!list.length) return;
  const lo = Math.min(...list.map((k) => Number(k.low)));
  const hi = Math.max(...list.map((k) => Number(k.high)));
  const span = hi - lo || 1;
  const y = (p) => h - 20 - ((Number(p) - lo) / span) * (h - 40);
  const step = w / CANDLES_MAX;
  list.forEach((k, i) => {
    const x = w - (list.length - i) * step + step / 2;
    const up = Number(k.close) >= Number(k.open);
    ctx.strokeStyle = ctx.fillStyle = up ? "#1a9850" : "#d73027";
    ctx.beginPath();
    ctx.moveTo(x, y(k.high));
    ctx.lineTo(x, y(k.low));
    ctx.stroke();
    const top = y(Math.max(Number(k.open), Number(k.close)));
    const body = Math.max(1, Math.abs(y(k.open) - y(k.close)));
    ctx.fillRect(x - step * 0.35, top, step * 0.7, body);
  });
  ctx.fillStyle = "#555";
  ctx.fillText(String(hi), 4, 12);
  ctx.fillText(String(lo), 4, h - 6);
}

function renderSubscriptions() {
  const items = [...ui.held].sort().map((ch) => {
    const li = el("li", ch + " ");
    const b = el("button", "unsubscribe");
    b.type = "button";
    b.addEventListener("click", () => send({ type: "unsubscribe", channels: [ch] }));
    li.append(b);
    return li;
  });
  $("subscriptions").replaceChildren(...items);
}

// The channel the picker describes.
function pickedChannel() {
  const kind = $("kind").value;
  if (kind === "portfolio" || kind === "orders") return `${kind}:${$("user").value.trim()}`;
  const market = `${$("symbol").value}@${$("exchange").value}`;
  if (kind === "klines") return `klines:${market}:${$("interval").value}`;
  if (kind === "depth") return `depth:${market}:${$("depth").value}`;
  if (kind === "signals") return `signals:${$("symbol").value}`;
  return `${kind}:${market}`;
}

function updatePicker() {
  const kind = $("kind").value;
  $("interval-label").hidden = kind !== "klines";
  $("depth-label").hidden = kind !== "depth";
  $("user-label").hidden = kind !== "portfolio" && kind !== "orders";
  $("channel-name").textContent = pickedChannel();
}

async function loadSymbols() {
  const exchange = $("exchange").value;
  const select = $("symbol");
  try {
    const r = await fetch(`/api/v1/instruments?exchange=${encodeURIComponent(exchange)}`);
    const body = await r.json();
    if (!body.success) throw new Error(body.error.message);
    const options = body.data
      .filter((i) => i.tradable)
      .map((i) => {
        const o = el("option", i.symbol);
        o.title = `${i.exchangeSymbol}: ${i.base}/${i.quote}`;
        return o;
      });
    select.replaceChildren(...options);
  } catch (e) {
    select.replaceChildren();
    notice(`instruments of ${exchange}: ${e.message}`, "error");
  }
  updatePicker();
}

async function pollStats() {
  try {
    const [stats, health] = await Promise.all([
      fetch("/api/v1/ws/stats").then((r) => r.json()),
      fetch("/health").then((r) => r.json()),
    ]);
    const d = stats.data;
    const facts = [
      ["clients", d.connectedClients],
      ["subscriptions", d.totalSubscriptions],
      ["channels", d.activeChannels.length],
      ["messages in", d.messagesIn],
      ["messages out", d.messagesOut],
      ["uptime", d.uptimeSeconds + " s"],
    ];
    $("stats").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", String(v))]));
    const rows = Object.entries(health.upstreams).map(([name, u]) => {
      const row = el("tr");
      row.dataset.state = u.state;
      const cells = [name, u.state + (u.lastError ? ": " + u.lastError : ""), u.connections ?? "", u.streams ?? "", u.since ?? ""];
      row.append(...cells.map((c) => el("td", String(c))));
      return row;
    });
    $("upstreams").tBodies[0].replaceChildren(...rows);
  } catch (e) {
    $("stats").replaceChildren(el("dt", "relay"), el("dd", "unreachable: " + e.message));
  }
}

function init() {
  $("connect-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("disconnect").addEventListener("click", () => ui.ws && ui.ws.close(1000));
  $("picker").addEventListener("submit", (e) => {
    e.preventDefault();
    const channel = pickedChannel();
    // A chart starts with the candles before now: the relay's history joins them to the live ones.
    const entry = $("kind").value === "klines" ? { channel, history: CANDLES_MAX } : channel;
    send({ type: "subscribe", channels: [entry] });
  });
  for (const id of ["kind", "symbol", "interval", "depth", "user"]) {
    $(id).addEventListener("change", updatePicker);
    $(id).addEventListener("input", updatePicker);
  }
  $("exchange").addEventListener("change", loadSymbols);
  loadSymbols();
  pollStats();
  setInterval(pollStats, 2000);
  connect();
}

init();
