"""The lease on a run's checkpoint location, on moto S3 (conditional writes) and on file://
(flock): one holder at a time, a second run refused naming the holder, a stale lease taken
over and said so, a lease lost to a takeover noticed by its refresher. No Ray here; the real
runs are in test_faults_training.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from finetune_trainer import lease as lease_mod
from finetune_trainer import storage
from finetune_trainer.lease import Lease, LeaseHeldError


def _stored(run_loc) -> dict:
    with run_loc.filesystem.open_input_stream(f"{run_loc.path}/{lease_mod.LEASE_FILE}") as f:
        return json.loads(f.read())


def test_second_run_is_refused_naming_the_holder(run_loc):
    first = Lease.acquire(run_loc, "attempt-1", refresh_s=10)
    held = _stored(run_loc)
    assert held["pid"] == os.getpid() and held["attempt"] == "attempt-1"
    with pytest.raises(LeaseHeldError) as info:
        Lease.acquire(run_loc, "attempt-2", refresh_s=10)
    message = str(info.value)
    assert "\n" not in message
    for needle in (run_loc.uri, f"pid {os.getpid()}", "attempt attempt-1", held["since"], "refused"):
        assert needle in message, (needle, message)
    first.release()
    second = Lease.acquire(run_loc, "attempt-2", refresh_s=10)  # released: free again
    assert _stored(run_loc)["attempt"] == "attempt-2"
    second.release()


def test_only_one_of_concurrent_runs_wins(run_loc):
    results: list = []

    def race(i):
        try:
            results.append(Lease.acquire(run_loc, f"racer-{i}", refresh_s=10))
        except LeaseHeldError as exc:
            results.append(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1, results
    assert _stored(run_loc)["attempt"] == winners[0].holder.attempt
    winners[0].release()


def test_stale_lease_is_taken_over_and_said(run_loc, capsys):
    # a holder that stopped refreshing (crashed on another machine): 4 intervals later it is stale
    clock = [1000.0]
    Lease.acquire(run_loc, "crashed", refresh_s=1, now=lambda: clock[0])
    clock[0] += 3
    with pytest.raises(LeaseHeldError):
        Lease.acquire(run_loc, "too-early", refresh_s=1, now=lambda: clock[0])
    clock[0] += 2
    taker = Lease.acquire(run_loc, "taker", refresh_s=1, now=lambda: clock[0])
    out = capsys.readouterr().out
    assert "took over the stale lease" in out and "attempt crashed" in out and "not refreshed for 5s" in out, out
    assert _stored(run_loc)["attempt"] == "taker"
    taker.release()


def test_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(run_loc, capsys):
    # a run killed here (SIGKILL): its pid is gone, its lease is fresh
    settings = f"storage.S3Settings({run_loc.settings.endpoint!r})" if run_loc.settings else "None"
    code = ("from finetune_trainer import storage; from finetune_trainer.lease import Lease; "
            f"Lease.acquire(storage.resolve({run_loc.uri!r}, {settings}), 'killed', refresh_s=600)")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ, timeout=120)
    held = _stored(run_loc)
    assert held["attempt"] == "killed" and held["pid"] != os.getpid()
    taker = Lease.acquire(run_loc, "rerun", refresh_s=600)
    out = capsys.readouterr().out
    assert f"process {held['pid']} on this machine is gone" in out, out
    taker.release()


def test_refresher_notices_a_takeover(run_loc):
    lost = threading.Event()
    holder = Lease.acquire(run_loc, "slow", refresh_s=0.2)
    assert holder.refresh()
    before = _stored(run_loc)["refreshed"]
    time.sleep(0.05)
    assert holder.refresh() and _stored(run_loc)["refreshed"] > before
    # another run takes it over (as after this one stalled past the stale time)
    later = time.time() + 10
    other = Lease.acquire(run_loc, "other", refresh_s=0.2, now=lambda: later)
    holder.start_refreshing(on_lost=lost.set)
    assert lost.wait(10), "the refresher did not notice"
    assert "lost the lease" in holder.lost and "attempt other" in holder.lost
    holder.release()  # must not delete the other run's lease
    assert _stored(run_loc)["attempt"] == "other"
    other.release()


def test_a_later_attempt_of_the_job_waits_out_an_earlier_attempts_lease(run_loc, capsys, monkeypatch):
    # The operator's attempt 1 lost its head pod: its driver died holding the lease. Attempt 2
    # of the same job waits for that lease to go stale instead of spending a retry on a refusal;
    # a run of another lineage (a job recreated under the same name) is refused as before.
    clock, slept = [1000.0], []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds
    monkeypatch.setenv("FINETUNE_ATTEMPT", "llama-1234abcd-a1")
    Lease.acquire(run_loc, "first", refresh_s=1, now=lambda: clock[0])
    monkeypatch.setenv("FINETUNE_ATTEMPT", "llama-9999ffff-a2")
    with pytest.raises(LeaseHeldError):
        Lease.acquire(run_loc, "stranger", refresh_s=1, now=lambda: clock[0], sleep=sleep)
    assert not slept
    monkeypatch.setenv("FINETUNE_ATTEMPT", "llama-1234abcd-a2")
    second = Lease.acquire(run_loc, "second", refresh_s=1, now=lambda: clock[0], sleep=sleep)
    assert 4 < sum(slept) <= 5.5, slept  # stale after 4 refresh intervals
    out = capsys.readouterr().out
    assert "held by the earlier attempt llama-1234abcd-a1" in out and "waiting up to 4s" in out, out
    assert "took over the stale lease" in out, out
    assert _stored(run_loc)["submission"] == "llama-1234abcd-a2"
    second.release()


def test_an_earlier_attempt_still_refreshing_its_lease_is_alive_and_refused(run_loc, monkeypatch):
    clock = [1000.0]
    monkeypatch.setenv("FINETUNE_ATTEMPT", "llama-1234abcd-a1")
    first = Lease.acquire(run_loc, "first", refresh_s=1, now=lambda: clock[0])

    def sleep(seconds):  # attempt 1 keeps refreshing while attempt 2 waits
        clock[0] += seconds
        assert first.refresh()
    monkeypatch.setenv("FINETUNE_ATTEMPT", "llama-1234abcd-a2")
    with pytest.raises(LeaseHeldError) as info:
        Lease.acquire(run_loc, "second", refresh_s=1, now=lambda: clock[0], sleep=sleep)
    assert 1008 <= clock[0] <= 1010  # gave up after twice the stale time
    assert "attempt first" in str(info.value)
    assert _stored(run_loc)["attempt"] == "first"
    first.release()
