"""The Ray Jobs client against a small fake of the dashboard's job endpoints.

The fake follows Ray's `job_head.py`: 404 for unknown ids, 400 ("already exists") for a
second submit of one submission id, bearer-token auth. The real head is exercised by the
e2e tests.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from finetune_operator.rayjobs import DashboardUnreachable, RayJobsClient, RayJobsError

TOKEN = "s3cr3t-token"


def fake_dashboard(jobs: dict, calls: list):
    async def check(request):
        calls.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized(text="token required")

    async def submit(request):
        await check(request)
        body = await request.json()
        sid = body["submission_id"]
        if sid.startswith("busy"):
            return web.Response(status=500, text="No available agent to submit job, please "
                                                 "try again later.")
        if sid in jobs:
            return web.Response(status=400, text=f"ValueError: Job with submission_id {sid} "
                                                 "already exists.")
        jobs[sid] = {"submission_id": sid, "status": "PENDING", "message": "",
                     "entrypoint": body["entrypoint"], "runtime_env": body["runtime_env"],
                     "logs": "hello\n"}
        return web.json_response({"job_id": "raysubmit_1", "submission_id": sid})

    async def get(request):
        await check(request)
        job = jobs.get(request.match_info["id"])
        if job is None:
            return web.Response(status=404, text="Job does not exist")
        return web.json_response({k: v for k, v in job.items() if k != "logs"})

    async def logs(request):
        await check(request)
        job = jobs.get(request.match_info["id"])
        if job is None:
            return web.Response(status=404, text="Job does not exist")
        return web.json_response({"logs": job["logs"]})

    async def stop(request):
        await check(request)
        job = jobs.get(request.match_info["id"])
        if job is None:
            return web.Response(status=404, text="Job does not exist")
        job["status"] = "STOPPED"
        return web.json_response({"stopped": True})

    app = web.Application()
    app.router.add_post("/api/jobs/", submit)
    app.router.add_get("/api/jobs/{id}", get)
    app.router.add_get("/api/jobs/{id}/logs", logs)
    app.router.add_post("/api/jobs/{id}/stop", stop)
    return app


def run_with_fake(scenario):
    async def main():
        jobs, calls = {}, []
        server = TestServer(fake_dashboard(jobs, calls))
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                base = str(server.make_url("/"))
                return await scenario(session, base, jobs, calls)
        finally:
            await server.close()
    return asyncio.run(main())


def test_a_submission_id_is_submitted_once():
    async def scenario(session, base, jobs, calls):
        client = RayJobsClient(session, base, TOKEN)
        env = {"FINETUNE_JOB": json.dumps({"spec": {}})}
        assert await client.submit("job-abc-a1", env) == "job-abc-a1"
        with pytest.raises(RayJobsError, match="already exists"):
            await client.submit("job-abc-a1", env)
        assert (await client.get("job-abc-a1")).status == "PENDING"
        assert jobs["job-abc-a1"]["entrypoint"] == "finetune-train"
        assert jobs["job-abc-a1"]["runtime_env"] == {"env_vars": env}
    run_with_fake(scenario)


def test_a_blind_second_submit_is_an_error_as_in_ray():
    async def scenario(session, base, jobs, calls):
        client = RayJobsClient(session, base, TOKEN)
        await client.submit("dup-a1", {})
        with pytest.raises(RayJobsError, match="already exists"):
            await client.submit("dup-a1", {})
    run_with_fake(scenario)


def test_get_logs_stop_and_unknown_ids():
    async def scenario(session, base, jobs, calls):
        client = RayJobsClient(session, base, TOKEN)
        assert await client.get("nope") is None
        assert await client.logs("nope") == ""
        assert await client.stop("nope") is False
        await client.submit("j-a1", {})
        assert await client.logs("j-a1") == "hello\n"
        assert await client.stop("j-a1") is True
        assert (await client.get("j-a1")).status == "STOPPED"
    run_with_fake(scenario)


def test_wrong_token_is_an_error_that_does_not_show_the_token():
    async def scenario(session, base, jobs, calls):
        client = RayJobsClient(session, base, "wrong-token-value")
        with pytest.raises(RayJobsError) as err:
            await client.get("x")
        assert "401" in str(err.value) and "wrong-token-value" not in str(err.value)
        assert "wrong-token-value" not in repr(client)
    run_with_fake(scenario)


def test_unreachable_dashboard():
    async def main():
        async with aiohttp.ClientSession() as session:
            # Port 9 (discard) on localhost: nothing listens, the connection is refused.
            client = RayJobsClient(session, "http://127.0.0.1:9", TOKEN, timeout=2)
            with pytest.raises(DashboardUnreachable):
                await client.get("x")
    asyncio.run(main())


def test_a_head_without_its_job_agent_yet_is_transient():
    async def scenario(session, base, jobs, calls):
        client = RayJobsClient(session, base, TOKEN)
        with pytest.raises(DashboardUnreachable, match="No available agent"):
            await client.submit("busy-a1", {})
        assert "busy-a1" not in jobs
    run_with_fake(scenario)
