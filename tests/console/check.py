#!/usr/bin/env python3
"""The web console in a real headless Chromium, driven over the DevTools protocol.

Starts the relay with --demo on a free port and Chromium (Debian's package) headless, opens
the console, subscribes through the picker's own controls (the same click a person makes),
and checks that the page connected, shows ticker rows, book levels and candles, logged no
console error, and that the relay's stats show the page's connection and subscriptions.
Saves a screenshot. Usage: check.py RELAY_BINARY SCREENSHOT.png   (CI: called by .ci/run)
"""

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

RELAY, SHOT = sys.argv[1], sys.argv[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def wait_for(what, probe, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception:  # not up yet
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


class Page:
    """One page target over CDP: commands by id, events collected."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events, self.replies = ws, 0, [], {}

    async def call(self, method, **params):
        self.next_id += 1
        my = self.next_id
        await self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while my not in self.replies:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if "id" in msg:
                self.replies[msg["id"]] = msg
            else:
                self.events.append(msg)
        reply = self.replies.pop(my)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def js(self, expression):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, what, expression, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        return None

    def errors(self):
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out


async def subscribe(page, kind, exchange, symbol, extra=""):
    # The picker's own controls: choose, then press Subscribe, as a person does.
    await page.js(f"""(async () => {{
        const set = (id, v) => {{ const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('change')); }};
        set('kind', '{kind}');
        if (document.getElementById('exchange').value !== '{exchange}') {{
            set('exchange', '{exchange}');
        }}
        for (let i = 0; i < 50 && ![...document.getElementById('symbol').options].some(o => o.value === '{symbol}'); i++)
            await new Promise(r => setTimeout(r, 100));
        set('symbol', '{symbol}');
        {extra}
        document.getElementById('subscribe').click();
        return document.getElementById('channel-name').textContent;
    }})()""")


async def main():
    port, devtools = free_port(), free_port()
    relay = subprocess.Popen([RELAY, "--demo", "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = tempfile.mkdtemp()
    browser = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for("the relay", lambda: get_json(base + "/ready")["status"] == "ready")
        browser = subprocess.Popen([
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1400,1000", f"--user-data-dir={profile}", f"--remote-debugging-port={devtools}",
            "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        targets = wait_for("Chromium's DevTools", lambda: [t for t in get_json(f"http://127.0.0.1:{devtools}/json/list") if t["type"] == "page"])
        async with websockets.connect(targets[0]["webSocketDebuggerUrl"], max_size=64 << 20) as ws:
            page = Page(ws)
            for domain in ("Runtime", "Log", "Page"):
                await page.call(f"{domain}.enable")
            await page.call("Page.navigate", url=base + "/")
            opened = await page.until("connected", "document.getElementById('state')?.textContent === 'open' && document.getElementById('hello').textContent")
            check("the page connects and shows the connected data", bool(opened) and "client c-" in opened, opened)
            # Chromium offers permessage-deflate on every WebSocket; what follows (its own
            # compressed requests, the compressed data) runs over the extension.
            ext = await page.js("ui.ws.extensions")
            check("Chromium negotiated permessage-deflate", (ext or "").startswith("permessage-deflate"), ext)
            symbols = await page.until("symbols", "document.getElementById('symbol').options.length")
            check("the picker lists the exchange's instruments", (symbols or 0) >= 5, symbols)
            await subscribe(page, "ticker", "binance", "BTCUSDT")
            await subscribe(page, "depth", "binance", "ETHUSDT", "set('depth', '10');")
            await subscribe(page, "klines", "binance", "BTCUSDT", "set('interval', '1s');")
            rows = await page.until("ticker rows", "document.querySelectorAll('#tickers tbody tr').length")
            check("the table shows ticker rows", (rows or 0) >= 1, rows)
            levels = await page.until("book levels", "document.querySelectorAll('#ladder tbody tr').length >= 10 && document.querySelectorAll('#ladder tbody tr').length")
            check("the ladder shows book levels", (levels or 0) >= 10, levels)
            candles = await page.until("candles", "Number(document.getElementById('chart').dataset.candles) >= 100 && Number(document.getElementById('chart').dataset.candles)")
            check("the chart draws candles, the history before the live ones", (candles or 0) >= 100, candles)
            logged = await page.js("document.querySelectorAll('#log li').length")
            check("the message log fills", (logged or 0) >= 5, logged)
            held = await page.js("[...document.querySelectorAll('#subscriptions li')].map(li => li.firstChild.textContent.trim())")
            want = ["depth:ETHUSDT@binance:10", "klines:BTCUSDT@binance:1s", "ticker:BTCUSDT@binance"]
            check("the subscriptions list shows what was subscribed", held == want, held)
            stats = get_json(base + "/api/v1/ws/stats")["data"]
            check("the relay counts the page's connection", stats["connectedClients"] >= 1, stats["connectedClients"])
            check("the relay holds the page's subscriptions", set(want) <= set(stats["activeChannels"]), stats["activeChannels"])
            upstream = await page.until("stats panel", "document.querySelector('#upstreams tbody tr[data-state=\"connected\"]') !== null")
            check("the stats panel shows upstream state", bool(upstream))
            await asyncio.sleep(1)
            shot = await page.call("Page.captureScreenshot", format="png")
            os.makedirs(os.path.dirname(os.path.abspath(SHOT)), exist_ok=True)
            with open(SHOT, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            print(f"screenshot: {SHOT}")
            errors = page.errors()
            check("no console errors", not errors, errors)

            # examples/chart.html, the README's chart: history and live on one channel, and a
            # reconnect that resumes with `since`.
            page.events.clear()
            chart = "file://" + os.path.abspath("examples/chart.html") + f"?ws=ws://127.0.0.1:{port}/ws&channel=klines:BTCUSDT:1s"
            await page.call("Page.navigate", url=chart)
            got = await page.until("history", "typeof candles !== 'undefined' && candles.size >= 100 && candles.size")
            check("the chart example gets its history", (got or 0) >= 100, got)
            newest = await page.js("Math.max(...candles.keys())")
            grew = await page.until("live candles", f"Math.max(...candles.keys()) >= {newest} + 2000")
            check("live candles continue the history", bool(grew))
            times = await page.js("[...candles.keys()].sort((a, b) => a - b)")
            holes = [(a, b) for a, b in zip(times, times[1:]) if b - a != 1000]
            check("history and live join without a missing or doubled second", not holes, holes[:5])
            before = await page.js("last.seq")
            await page.js("ws.close()")
            back = await page.until("the resume", "resumed === 1")
            check("a dropped connection resumes where it left off (recovered:true)", bool(back))
            after = await page.until("live after the resume", f"last.seq > {before} && last.seq")
            check("and goes on", (after or 0) > before, after)
            times = await page.js("[...candles.keys()].sort((a, b) => a - b)")
            holes = [(a, b) for a, b in zip(times, times[1:]) if b - a != 1000]
            check("no second is missing across the reconnect", not holes, holes[:5])
            errors = [e for e in page.errors() if "gap" not in e]
            check("the chart page logged no error", not errors, errors)
    finally:
        for p in (browser, relay):
            if p:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(profile, ignore_errors=True)
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


asyncio.run(main())
