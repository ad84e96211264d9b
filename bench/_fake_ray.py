"""The cluster side of the operator benchmark, in a process of its own (not the operator's):

- the test bed's KubeRay stand-in, which marks every RayCluster ready (after its usual 0.2 s) and
  publishes 127.0.0.1:<port below> as the head's dashboard;
- a light Ray Jobs HTTP API on that port (aiohttp): `POST /api/jobs/` accepts a submission,
  `GET /api/jobs/<id>` says RUNNING once submitted (404 before, as Ray does), `GET
  /api/jobs/<id>/logs` returns one `progress` event line, `POST /api/jobs/<id>/stop` stops.
  No training happens: the benchmark measures the operator, not Ray.
- `GET /stats`: request counts by route, for requests-per-job figures.

    python -m bench._fake_ray --kube-url URL --token TOKEN
    -> prints {"dashboard_port": PORT, "pid": PID} and serves until SIGTERM
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal

import aiohttp.web

from finetune_api.events import format_event
from finetune_testbed.kuberay_standin import HeadAddress, KubeRayStandIn


def build_app() -> aiohttp.web.Application:
    submitted: dict[str, dict] = {}
    counts: collections.Counter[str] = collections.Counter()
    # One progress line, made once: every poll reads the same log, as a job between two
    # progress prints would look.
    log = format_event("progress", step=1, totalSteps=1000, epoch=0, loss=2.5, learningRate=1e-4,
                       tokensPerSecond=1000.0, etaSeconds=999) + "\n"

    async def submit(request: aiohttp.web.Request) -> aiohttp.web.Response:
        counts["POST /api/jobs/"] += 1
        body = await request.json()
        sub_id = body["submission_id"]
        if sub_id in submitted:
            return aiohttp.web.Response(status=400, text=f"Job with submission_id {sub_id} already exists.")
        submitted[sub_id] = {"status": "RUNNING"}
        return aiohttp.web.json_response({"submission_id": sub_id, "job_id": sub_id})

    async def describe(request: aiohttp.web.Request) -> aiohttp.web.Response:
        counts["GET /api/jobs/{id}"] += 1
        sub_id = request.match_info["sub_id"]
        job = submitted.get(sub_id)
        if job is None:
            return aiohttp.web.Response(status=404, text="not found")
        return aiohttp.web.json_response({"submission_id": sub_id, "job_id": sub_id, "type": "SUBMISSION",
                                          "status": job["status"], "message": "Job is running.",
                                          "driver_exit_code": None, "start_time": 0, "end_time": None})

    async def logs(request: aiohttp.web.Request) -> aiohttp.web.Response:
        counts["GET /api/jobs/{id}/logs"] += 1
        if request.match_info["sub_id"] not in submitted:
            return aiohttp.web.Response(status=404, text="not found")
        return aiohttp.web.json_response({"logs": log})

    async def stop(request: aiohttp.web.Request) -> aiohttp.web.Response:
        counts["POST /api/jobs/{id}/stop"] += 1
        job = submitted.get(request.match_info["sub_id"])
        if job is None:
            return aiohttp.web.Response(status=404, text="not found")
        job["status"] = "STOPPED"
        return aiohttp.web.json_response({"stopped": True})

    async def stats(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"requests": dict(counts), "submitted": len(submitted)})

    app = aiohttp.web.Application()
    app.router.add_post("/api/jobs/", submit)
    app.router.add_get("/api/jobs/{sub_id}", describe)
    app.router.add_get("/api/jobs/{sub_id}/logs", logs)
    app.router.add_post("/api/jobs/{sub_id}/stop", stop)
    app.router.add_get("/stats", stats)
    return app


async def amain(args: argparse.Namespace) -> None:
    runner = aiohttp.web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    head = HeadAddress(host="127.0.0.1", dashboard_port=port, token=None)
    standin = KubeRayStandIn(args.kube_url, args.token, head, ready_delay=args.ready_delay).start()
    print(json.dumps({"dashboard_port": port, "pid": os.getpid()}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    standin.stop()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kube-url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ready-delay", type=float, default=0.2)
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
