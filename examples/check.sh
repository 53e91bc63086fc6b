#!/usr/bin/env bash
# Runs what README.md tells a newcomer to run by hand, as printed, against a real relay in
# --demo mode: every `curl` line of "Try it by hand" and the two example clients. The relay
# listens on a free port instead of 3000 (the only change made to a command).
# Usage: examples/check.sh [path/to/exchange-relay]   (CI: called by .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/debug/exchange-relay}"
WORK="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$BIN" --demo --listen "127.0.0.1:$PORT" >"$WORK/relay.log" 2>&1 &
RELAY=$!
trap 'kill $RELAY 2>/dev/null || true; wait $RELAY 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do
  curl -sf "localhost:$PORT/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "localhost:$PORT/ready" >/dev/null || { cat "$WORK/relay.log"; echo "relay never ready" >&2; exit 1; }

fail=0
passed=0
check() { # name, command, expected text in its output
  local out
  if out="$(bash -c "$2" 2>&1)" && grep -q -- "$3" <<<"$out"; then
    passed=$((passed + 1)); echo "ok   $1"
  else
    fail=$((fail + 1)); echo "FAIL $1"; echo "$out" | head -20
  fi
}

# Every curl command of the README's "Try it by hand" section, continuation lines joined.
python3 - "$PORT" >"$WORK/curls" <<'PY'
import re, sys
port = sys.argv[1]
text = open("README.md").read()
section = text[text.index("## Try it by hand"):]
section = section[:section.index("\n## ", 3)]
joined = re.sub(r"\\\n\s*", " ", section)
for line in joined.splitlines():
    line = line.strip()
    if line.startswith("curl "):
        print(re.sub(r"\s+#.*$", "", line).replace("localhost:3000", f"localhost:{port}"))
PY
[ "$(wc -l <"$WORK/curls")" -ge 4 ] || { echo "README curl lines not found" >&2; exit 1; }
while IFS= read -r cmd; do
  case "$cmd" in
    *publish*) check "$cmd" "$cmd" '"success":true' ;;
    *health*) check "$cmd" "$cmd" '"status":"ok"' ;;
    *ready*) check "$cmd" "$cmd" '"status":"ready"' ;;
    *openapi*) check "$cmd" "$cmd" '"openapi":"3.' ;;
    *) check "$cmd" "$cmd" '"success":true' ;;
  esac
done <"$WORK/curls"
check "curl -i /ws (not a WebSocket request)" "curl -si localhost:$PORT/ws" "426"

# The README's TLS example (§ Security): its openssl line as printed, then the relay on those
# files with the printed environment, and its curl line (free port, this build's binary).
command -v openssl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
python3 - >"$WORK/tls.sh" <<'PY'
text = open("README.md").read()
section = text[text.index("## Security"):]
section = section[:section.index("\n## ", 3)]
block = section[section.index("```sh\n") + 6:]
block = block[:block.index("```")]
print("\n".join(block.strip().splitlines()))
PY
[ "$(wc -l <"$WORK/tls.sh")" -eq 3 ] || { echo "README TLS example not found" >&2; exit 1; }
TLS_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
(cd "$WORK" && bash -c "$(sed -n 1p "$WORK/tls.sh")") >/dev/null 2>&1
ENVS="$(sed -n 2p "$WORK/tls.sh" | sed -E 's/ cargo run.*//')"
BIN_ABS="$(realpath "$BIN")"
(cd "$WORK" && env $ENVS "$BIN_ABS" --demo --listen "127.0.0.1:$TLS_PORT" >"$WORK/tls-relay.log" 2>&1) &
TLS_RELAY=$!
trap 'kill $RELAY $TLS_RELAY 2>/dev/null || true; wait $RELAY 2>/dev/null || true; rm -rf "$WORK"' EXIT
TLS_CURL="$(sed -n 3p "$WORK/tls.sh" | sed "s/localhost:3000/localhost:$TLS_PORT/")"
for _ in $(seq 1 100); do
  (cd "$WORK" && $TLS_CURL >/dev/null 2>&1) && break
  sleep 0.1
done
check "$TLS_CURL (README § Security)" "cd $WORK && $TLS_CURL" '"status":"ok"'
kill $TLS_RELAY 2>/dev/null || true

# The Python example, in a virtualenv with the one package it needs.
VENV="${EXAMPLES_VENV:-/tmp/exchange-relay-examples-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import websockets, openapi_spec_validator' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "websockets==17.4" "openapi-spec-validator==0.9.0"
fi
check "python3 examples/client.py" "timeout 60 $VENV/bin/python examples/client.py ws://localhost:$PORT/ws 20" "trades:BTCUSDT: "

# permessage-deflate with real clients: Python websockets (it offers the extension and
# compresses what it sends) and Node ws (threshold 0, so its subscribe goes compressed too).
cat >"$WORK/deflate.py" <<'PY'
import asyncio, json, sys
import websockets
async def main(url):
    async with websockets.connect(url) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ext.startswith("permessage-deflate"), ext
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe", "channels": ["depth:BTCUSDT:20"], "id": 1}))
        while json.loads(await ws.recv())["type"] != "depth":
            pass
        print("python websockets: " + ext + ": depth received")
asyncio.run(main(sys.argv[1]))
PY
check "python websockets with permessage-deflate" "timeout 30 $VENV/bin/python $WORK/deflate.py ws://localhost:$PORT/ws" "depth received"

# The OpenAPI document, checked by a validator that is not the one that wrote it.
curl -sf "localhost:$PORT/api/v1/openapi.json" >"$WORK/openapi.json"
check "openapi-spec-validator /api/v1/openapi.json" "$VENV/bin/openapi-spec-validator $WORK/openapi.json" "OK"

# The Node example, with the locked `ws` package.
if ! command -v node >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
(cd examples && npm ci --no-audit --no-fund --silent)
check "node examples/client.mjs" "cd examples && timeout 60 node client.mjs ws://localhost:$PORT/ws 30" "trades:ETHUSD@kraken: "
cat >"examples/.deflate-check.mjs" <<'JS'
import WebSocket from "ws";
const ws = new WebSocket(process.argv[2], { perMessageDeflate: { threshold: 0 } });
ws.on("open", () => {
  if (!ws.extensions.startsWith("permessage-deflate")) { console.log("not negotiated: " + ws.extensions); process.exit(1); }
  ws.send(JSON.stringify({ type: "subscribe", channels: ["trades:BTCUSDT"], id: 1 }));
});
ws.on("message", (data) => {
  const m = JSON.parse(data.toString());
  if (m.type === "trade") { console.log("node ws: " + ws.extensions + ": trade received"); ws.close(1000); }
});
JS
check "node ws with permessage-deflate" "cd examples && timeout 30 node .deflate-check.mjs ws://localhost:$PORT/ws" "trade received"
rm -f examples/.deflate-check.mjs

echo "$passed passed, $fail failed"
[ "$fail" -eq 0 ]
