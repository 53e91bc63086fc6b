#!/usr/bin/env python3
"""Runs the Autobahn WebSocket conformance cases (via the pinned `kosoku` package) against the
relay's WebSocket stack and compares every case's outcome with tests/autobahn/expected.json.

The relay serves `/autobahn` with `server.autobahn_echo = true`: an echo endpoint with the same
WebSocket settings and error handling as `/ws` (the cases expect an echo server; `/ws` greets
every client with `connected`, which no case expects). Excluded: 9.* (messages up to 16 MiB,
beyond `max_message_bytes`: the relay answers 1009 by design). The permessage-deflate cases
12.*/13.* send messages of up to 128 KiB, so the run raises `max_message_bytes` to 256 KiB (the
other cases' outcomes do not depend on it).

    check.py RELAY_BINARY            compare, exit 1 on any difference
    check.py RELAY_BINARY --update   rewrite expected.json from this run
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import kosoku

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED = os.path.join(HERE, "expected.json")
EXCLUDE = ["9.*"]
ONLY = os.environ.get("AUTOBAHN_CASES")  # e.g. "12.*,13.*" while working on one area


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    relay, update = sys.argv[1], "--update" in sys.argv[2:]
    port = free_port()
    env = dict(
        os.environ,
        RELAY_SERVER__AUTOBAHN_ECHO="true",
        RELAY_SERVER__MAX_MESSAGE_BYTES=str(256 * 1024),
        RUST_LOG="warn",
    )
    proc = subprocess.Popen([relay, "--demo", "--listen", f"127.0.0.1:{port}"], env=env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("relay did not start")
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as out:
            cwd = os.getcwd()
            os.chdir(out)
            try:
                results = asyncio.run(
                    kosoku.run_fuzzingclient(
                        f"ws://127.0.0.1:{port}/autobahn",
                        cases=ONLY.split(",") if ONLY else None,
                        exclude_cases=EXCLUDE,
                        concurrency=8,
                    )
                )
            except kosoku.FailureError as e:
                results = e.results
            finally:
                os.chdir(cwd)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    name = lambda v: str(v).rsplit(".", 1)[-1]  # Behavior.OK -> OK
    actual = {r.case_id: f"{name(r.behavior)}/{name(r.behavior_close)}" for r in results}
    if update:
        with open(EXPECTED, "w") as f:
            json.dump(dict(sorted(actual.items(), key=lambda kv: [int(p) for p in kv[0].split(".")])), f, indent=1)
            f.write("\n")
        print(f"autobahn: wrote {len(actual)} expected results")
        return
    with open(EXPECTED) as f:
        expected = json.load(f)
    diffs = [
        f"  {case}: expected {expected.get(case, '(absent)')}, got {actual.get(case, '(absent)')}"
        for case in sorted(set(expected) | set(actual))
        if expected.get(case) != actual.get(case)
    ]
    passed = sum(1 for v in actual.values() if v.split("/")[0] == "OK")
    print(f"autobahn: {len(actual)} cases run, {passed} behave OK, {len(diffs)} differ from expected.json")
    if diffs:
        print("\n".join(diffs))
        sys.exit(1)


if __name__ == "__main__":
    main()
