#!/usr/bin/env python3
"""A complete exchange-relay client: subscribe, print what arrives, answer errors.

    python3 -m pip install websockets
    python3 examples/client.py                      # ws://localhost:3000/ws, 20 messages
    python3 examples/client.py ws://relay:3000/ws 100

It subscribes to a price, a trade tape and a 1-minute candle stream, prints each data message
in one line, prints errors with the relay's own words, and stops after COUNT data messages.
"""

import asyncio
import json
import sys
from decimal import Decimal

import websockets

URL = sys.argv[1] if len(sys.argv) > 1 else "ws://localhost:3000/ws"
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 20
CHANNELS = ["price:BTCUSDT", "trades:BTCUSDT", "klines:ETHUSDT:1m"]


def parse(text):
    # Amounts are exact decimals on the wire: keep them exact (a float prints 7e-05).
    return json.loads(text, parse_float=Decimal)


def describe(msg):
    data = msg["data"]
    kind = msg["type"]
    if kind == "price":
        return f"{msg['channel']}: {data['price']} ({data['changePercent24h']}% in 24 h)"
    if kind == "trade":
        return f"{msg['channel']}: {data['side']} {data['quantity']} @ {data['price']}"
    if kind == "kline":
        state = "final" if data["isFinal"] else "forming"
        return (f"{msg['channel']}: {state} candle at {data['time']} "
                f"O {data['open']} H {data['high']} L {data['low']} C {data['close']} V {data['volume']}")
    return f"{msg['channel']}: {kind} {json.dumps(data, default=str)}"


async def main():
    async with websockets.connect(URL) as ws:
        hello = parse(await ws.recv())
        print(f"connected as {hello['data']['clientId']}")
        await ws.send(json.dumps({"type": "subscribe", "channels": CHANNELS, "id": 1}))
        seen = 0
        while seen < COUNT:
            msg = parse(await ws.recv())
            kind = msg["type"]
            if kind == "subscribed":
                print(f"subscribed to {msg['channel']}")
            elif kind == "error":
                print(f"error on {msg.get('channel')}: {msg['data']['code']}: {msg['data']['message']}")
            elif "data" in msg:
                print(describe(msg))
                seen += 1
        await ws.send(json.dumps({"type": "unsubscribe", "channels": CHANNELS, "id": 2}))


if __name__ == "__main__":
    asyncio.run(main())
