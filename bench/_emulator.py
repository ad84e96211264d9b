"""The test bed's API emulator as a process of its own, plus a read-only view of its recorder.

finetune_testbed/emulator.py serves everything except its `Recorder`, which lives in the server's
memory. Its documented hook for ad-hoc endpoints (`emulator['get /metrics'] << ...`, see
`KubeEmulator._route`) answers 404 with kmock 0.8 (kmock's scaffold fallbacks win; reported to
the lead), so this process subclasses the emulator and answers one extra authenticated path,
`GET /debug/recorder`, before the emulator's own routing: the recorder's per-identity call
counts as JSON. Everything else is the emulator's code, unchanged.

    python -m bench._emulator --token admin=T1 --token operator=T2
    -> prints {"url": "http://127.0.0.1:PORT", "pid": ...} and serves until SIGTERM
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading

import aiohttp.web

from finetune_testbed import emulator as emu


class BenchEmulator(emu.KubeEmulator):
    async def _route(self, raw, identity, content):
        if raw.path == "/debug/recorder":
            return aiohttp.web.json_response(recorder_snapshot(self))
        if raw.path == "/debug/requests":  # the bounded log of recent requests (debugging)
            return aiohttp.web.json_response([[r.at, r.identity, r.method, r.path, r.status]
                                              for r in list(self.recorder.log)])
        return await super()._route(raw, identity, content)


def make_emulator(tokens: dict[str, str], **kwargs) -> BenchEmulator:
    """emu.make_emulator with the subclass: the same CRDs."""
    emulator = BenchEmulator(tokens=dict(tokens), **kwargs)
    emulator.declare_crd(emu.PROJECT_CRD)
    if emu.KUBERAY_CRD.exists():
        emulator.declare_crd(emu.KUBERAY_CRD, "v1")
    return emulator


def recorder_snapshot(emulator) -> dict:
    """{identity: [[verb, group, resource, subresource, namespace, count], ...]}"""
    rec = emulator.recorder
    with rec._lock:  # the emulator's own lock around its counters
        return {identity: [[c.verb, c.group, c.resource, c.subresource, c.namespace, n]
                           for c, n in counter.items()]
                for identity, counter in rec.calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", action="append", default=[], metavar="IDENTITY=TOKEN")
    args = parser.parse_args()
    tokens = {token: identity for identity, token in (t.split("=", 1) for t in args.token)}
    # The watch history must hold every event of the largest run's burst, or a kopf watch that
    # reconnects from an old resourceVersion gets 410 Gone and relists (an emulator artefact).
    emulator = make_emulator(tokens, history_size=200_000)
    runner = emu.EmulatorThread(emulator, args.host).start()
    print(json.dumps({"url": runner.url, "pid": os.getpid()}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    runner.stop()


if __name__ == "__main__":
    main()
