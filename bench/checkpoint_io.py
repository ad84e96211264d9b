"""Checkpoint I/O: the trainer's checkpoint upload to S3 against boto3's TransferManager, and the
training stall per checkpoint.

S3 is a moto server in server mode, in its own process on 127.0.0.1.

1. Stall: the project's trainer (`finetune-train`, DeepSpeed ZeRO-3, N CPU workers, its own Ray)
   trains a Llama-style model of ~30M parameters (a ~400 MB fp32 ZeRO checkpoint: weights and
   Adam state) with a checkpoint to S3 every K steps, once per upload mode (SYNC, ASYNC through
   FINETUNE_CHECKPOINT_UPLOAD_MODE; the trainer's default is marked). Per checkpoint:
   - stall: how long the step loop stood still, the trainer's own line (rank 0, monotonic clock
     around `save_checkpoint`: local save + report, + upload and registration with SYNC);
   - announced after: rank 0's `progress` event of the step (printed before the save) to its
     `checkpoint` event (printed once Ray Train registered the checkpoint, every rank's files
     being in S3): how long until the checkpoint is durable;
   - lost per checkpoint: (time from step 1's `progress` to the last checkpoint's event) minus
     (steps - 1) x a clean step (the SYNC run's median step with no upload running), divided by
     the checkpoints: what checkpointing costs the run, background uploads slowing steps included;
   - the ranks' own upload lines (files, MB, s, MB/s of each rank's part, both ranks at once).

2. Upload: one checkpoint the trainer wrote (downloaded back from S3, so these are exactly its
   files) is uploaded again, alternating, (a) "ours": the trainer's uploader,
   `finetune_trainer.storage.upload_dir` (boto3 TransferManager with the trainer's settings, what
   every rank runs on its own part), on the whole checkpoint; (b) the baseline: boto3's
   TransferManager with its default `TransferConfig`, all files submitted to one manager; (c) for
   reference, what the trainer did before: Ray Train's own `persist_current_checkpoint` =
   `create_dir` + `_pyarrow_fs_copy_files` (pyarrow `copy_files`, use_threads=False for S3).
   Ratio = ours MB/s / boto3 MB/s (goal >= 1.0).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import table, write_results
from bench.trainer_overhead import base_env, build_assets, job_document, run_trainer
from finetune_testbed.s3 import moto_process, s3_client

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
               "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench-ckpt"


# --- 1. the stall --------------------------------------------------------------------------------

UPLOAD_LINE = re.compile(r"rank (\d+) uploaded its part of (\S+): (\d+) files, ([\d.]+) MB in ([\d.]+)s "
                         r"\(([\d.]+) MB/s, (\w+)\)")


def stall_run(mode: str, assets: dict[str, Any], a: argparse.Namespace, workdir: Path,
              endpoint: str) -> dict[str, Any]:
    env = base_env()
    env.pop("RAY_ADDRESS", None)
    env.update(CREDENTIALS)
    env["FINETUNE_CHECKPOINT_UPLOAD_MODE"] = mode
    a.gpus_per_worker = 0
    job = job_document(f"ckpt-{mode.lower()}", assets, "deepspeed", a, "unused")
    job["spec"]["checkpoint"] = {"uri": f"s3://{BUCKET}/{mode.lower()}", "everySteps": a.every,
                                 "keep": a.steps // a.every + 1}
    job["spec"]["s3"] = {"endpoint": endpoint, "region": "us-east-1"}
    r = run_trainer(job, workdir, env, f"stall-{mode.lower()}")
    events = r["events"]
    progress = {e["step"]: e["time"] for e in events if e["event"] == "progress"}
    ckpts = [(e["step"], e["time"], e["uri"]) for e in events if e["event"] == "checkpoint"]
    own, uploads = {}, []
    for line in Path(r["log"]).read_text().splitlines():
        m = re.search(r"checkpoint at step (\d+) stalled training for ([\d.]+)s", line)
        if m:
            own[int(m.group(1))] = float(m.group(2))
        m = UPLOAD_LINE.search(line)
        if m:
            uploads.append({"rank": int(m.group(1)), "checkpoint": m.group(2), "files": int(m.group(3)),
                            "MB": float(m.group(4)), "s": float(m.group(5)), "MBps": float(m.group(6)),
                            "method": m.group(7)})
    stalls = [{"step": s, "stall_s": own.get(s), "announced_after_s": t - progress[s], "uri": uri}
              for s, t, uri in ckpts if s in progress]
    ckpt_steps = {s for s, _, _ in ckpts}
    # A normal step: consecutive progress events, neither following a checkpoint nor step 1.
    steps = [progress[s] - progress[s - 1] for s in sorted(progress)
             if s - 1 in progress and s - 1 not in ckpt_steps and s > 2]
    last_step = max(progress)
    return {"mode": mode, "stalls": stalls, "step_s_median": statistics.median(steps) if steps else None,
            "steps": last_step, "uploads": uploads,
            # step 1's progress event to the last checkpoint's event (every checkpoint durable)
            "window_s": max(t for _, t, _ in ckpts) - progress[1] if ckpts and 1 in progress else None,
            "wall_s": r["wall_s"], "log": r["log"]}


# --- 2. the upload -------------------------------------------------------------------------------

def download_checkpoint(client, prefix: str, dest: Path) -> tuple[list[Path], int]:
    keys = []
    prefix = prefix.rstrip("/") + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        # Keys ending in "/" are the directory markers pyarrow's create_dir leaves: not files.
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    files = []
    for key in keys:
        local = dest / key[len(prefix):].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(local))
        files.append(local)
    return files, sum(f.stat().st_size for f in files)


def upload_ours(local: Path, endpoint: str, dest: str) -> float:
    """The trainer's uploader (what each rank runs on its part), on the whole checkpoint."""
    from finetune_trainer.storage import S3Settings, resolve, upload_dir

    loc = resolve(f"s3://{dest}", S3Settings(endpoint=endpoint, region="us-east-1"))
    t0 = time.perf_counter()
    stats = upload_dir(str(local), loc)
    elapsed = time.perf_counter() - t0
    assert stats.method == "boto3", stats
    return elapsed


def upload_ray_way(local: Path, endpoint: str, dest: str) -> float:
    """Ray Train V2's persist_current_checkpoint, on the trainer's S3FileSystem (the trainer's
    upload before it had its own)."""
    from ray.train.v2._internal.execution.storage import _pyarrow_fs_copy_files

    from finetune_trainer.storage import S3Settings, s3_filesystem

    fs = s3_filesystem(S3Settings(endpoint=endpoint, region="us-east-1"))
    t0 = time.perf_counter()
    fs.create_dir(dest)
    _pyarrow_fs_copy_files(source=str(local), destination=dest, destination_filesystem=fs)
    return time.perf_counter() - t0


def upload_boto3(local: Path, files: list[Path], endpoint: str, prefix: str) -> float:
    """boto3's TransferManager, default TransferConfig (8 MiB parts, 10 threads), all files."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    client = s3_client(endpoint, CREDENTIALS)
    t0 = time.perf_counter()
    with create_transfer_manager(client, TransferConfig()) as manager:
        futures = [manager.upload(str(f), BUCKET, f"{prefix}/{f.relative_to(local).as_posix()}")
                   for f in files]
        for fut in futures:
            fut.result()
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench checkpoint_io", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--every", type=int, default=3, help="checkpoint every this many steps")
    p.add_argument("--repeats", type=int, default=5, help="uploads of each kind, alternating")
    p.add_argument("--modes", default="SYNC,ASYNC")
    p.add_argument("--no-ray-way", action="store_true", help="skip the (slow) reference upload the Ray way")
    a = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-checkpoint-io-"))
    tokens_needed = int(a.workers * a.micro_batch * a.seq_len * a.steps * 1.5)
    assets = build_assets(a.hidden, a.layers, a.heads, a.intermediate, a.vocab, tokens_needed)
    print(f"checkpoint_io: model {assets['params'] / 1e6:.1f}M params, {a.workers} workers, "
          f"checkpoint every {a.every} of {a.steps} steps; logs in {workdir}", flush=True)
    os.environ.update(CREDENTIALS)
    moto, endpoint = moto_process(workdir)
    try:
        client = s3_client(endpoint, CREDENTIALS)
        client.create_bucket(Bucket=BUCKET)
        stalls = {}
        for mode in [m.strip().upper() for m in a.modes.split(",") if m.strip()]:
            print(f"  trainer run, upload mode {mode} ...", flush=True)
            stalls[mode] = stall_run(mode, assets, a, workdir, endpoint)

        # The files of the SYNC run's last complete checkpoint (every rank's part).
        ref = next(iter(stalls.values()))["stalls"][-1]["uri"]
        prefix = ref[len(f"s3://{BUCKET}/"):]
        local = workdir / "checkpoint"
        files, size = download_checkpoint(client, prefix, local)
        mb = size / 1e6
        print(f"  uploading {len(files)} files, {mb:.0f} MB, {a.repeats}x each way ...", flush=True)
        times: dict[str, list[float]] = {"ours": [], "boto3": [], "ray": []}
        for i in range(a.repeats):
            # The order turns each round, so neither side always goes first.
            kinds = ["ours", "boto3"] if i % 2 == 0 else ["boto3", "ours"]
            if not a.no_ray_way:
                kinds.append("ray")
            for kind in kinds:
                if kind == "ours":
                    times[kind].append(upload_ours(local, endpoint, f"{BUCKET}/upload-ours-{i}"))
                elif kind == "boto3":
                    times[kind].append(upload_boto3(local, files, endpoint, f"upload-boto3-{i}"))
                else:
                    times[kind].append(upload_ray_way(local, endpoint, f"{BUCKET}/upload-ray-{i}"))
            # Keep moto's memory flat: each copy is deleted before the next.
            for kind in kinds:
                keys = [o["Key"] for pg in client.get_paginator("list_objects_v2").paginate(
                    Bucket=BUCKET, Prefix=f"upload-{kind}-{i}") for o in pg.get("Contents", [])]
                for k in keys:
                    client.delete_object(Bucket=BUCKET, Key=k)
    finally:
        moto.terminate()
        moto.wait(10)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    upload = {"files": len(files), "bytes": size, **{f"{k}_s": v for k, v in times.items() if v},
              **{f"{k}_MBps_median": mb / t for k, t in med.items()},
              "ratio_ours_over_boto3": med["boto3"] / med["ours"],
              "pair_ratios": [b / o for o, b in zip(times["ours"], times["boto3"])]}
    labels = {"ours": "ours: trainer's uploader (storage.upload_dir, boto3)",
              "boto3": "boto3 TransferManager (defaults)",
              "ray": "before: Ray persist (pyarrow copy_files)"}
    rows = [(labels[k], mb, med[k], mb / med[k], ", ".join(f"{x:.2f}" for x in times[k])) for k in med]
    text = table(("upload of one checkpoint", "MB", "median s", "MB/s", "runs (s)"), rows)
    r_ = upload["ratio_ours_over_boto3"]
    text += (f"\n\nupload ratio ours/boto3 (MB/s): {r_:.2f} (goal >= 1.0: {'met' if r_ >= 1.0 else 'NOT met'}; "
             f"per round: {', '.join(f'{x:.2f}' for x in upload['pair_ratios'])})")
    from finetune_trainer.launcher import DEFAULT_UPLOAD_MODE

    clean_step = (stalls.get("SYNC") or next(iter(stalls.values())))["step_s_median"]
    srows, lost = [], {}
    for mode, s in stalls.items():
        n = len(s["stalls"])
        lost[mode] = (s["window_s"] - (s["steps"] - 1) * clean_step) / n if n and s["window_s"] else None
        s["lost_per_checkpoint_s"] = lost[mode]
        label = mode + (" (default)" if mode == DEFAULT_UPLOAD_MODE else "")
        for st in s["stalls"]:
            srows.append((label, st["step"], st["stall_s"], st["announced_after_s"], s["step_s_median"], lost[mode]))
    text += "\n\n" + table(("upload mode", "checkpoint step", "stall s (trainer's own line)",
                            "announced after s", "normal step s", "lost per checkpoint s"), srows)
    urows = []
    for mode, s in stalls.items():
        for rank in sorted({u["rank"] for u in s["uploads"]}):
            mine = [u for u in s["uploads"] if u["rank"] == rank]
            urows.append((mode, rank, len(mine), statistics.median(u["MB"] for u in mine),
                          statistics.median(u["s"] for u in mine), statistics.median(u["MBps"] for u in mine),
                          ", ".join(sorted({u["method"] for u in mine}))))
    if urows:
        text += "\n\n" + table(("in the runs: upload mode", "rank", "uploads", "MB (median)", "s (median)",
                                "MB/s (median)", "method"), urows)
    print(text)
    path = write_results("checkpoint_io", {
        "model": assets, "settings": vars(a), "upload": upload, "stalls": stalls, "table": text,
        "default_mode": DEFAULT_UPLOAD_MODE, "clean_step_s": clean_step,
        "goals": {"upload_ratio": ">= 1.0", "stall": "well below the upload time"},
    }, ["python", "-m", "bench", "checkpoint_io", *argv])
    print(f"results: {path}; logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
