"""Checkpoint I/O: the trainer's checkpoint upload to S3 against boto3's TransferManager, and the
training stall per checkpoint.

S3 is a moto server in server mode, in its own process on 127.0.0.1.

1. Stall: the project's trainer (`finetune-train`, DeepSpeed ZeRO-3, N CPU workers, its own Ray)
   trains a Llama-style model of ~30M parameters (a ~400 MB fp32 ZeRO checkpoint: weights and
   Adam state) with a checkpoint to S3 every K steps, once with the trainer's default upload mode
   (SYNC) and once with FINETUNE_CHECKPOINT_UPLOAD_MODE=ASYNC. The step loop is blocked, per
   checkpoint, from rank 0's `progress` event of the checkpoint step (printed before the save) to
   its `checkpoint` event (printed when `save_checkpoint` returns): both are the trainer's own
   events. A normal step's time is taken from the other steps and reported beside it.

2. Upload: one checkpoint the trainer wrote (downloaded back from S3, so these are exactly its
   files) is uploaded again, alternating, (a) the way Ray Train persists a checkpoint:
   `StorageContext.persist_current_checkpoint` = `create_dir` + Ray's `_pyarrow_fs_copy_files`
   (pyarrow `copy_files`, use_threads=False for S3, 64 MiB chunks) onto the trainer's own
   `S3FileSystem` (`finetune_trainer.storage.s3_filesystem`, `endpoint_override`), and (b) boto3's
   TransferManager with its default `TransferConfig`, all files submitted to one manager.
   Ratio = trainer-way MB/s / boto3 MB/s (goal >= 1.0). Stall vs upload: the SYNC stall is save +
   upload + barrier; the goal is a stall well below the upload time.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import VENV_BIN, free_port, table, write_results
from bench.trainer_overhead import base_env, build_assets, job_document, run_trainer

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
               "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench-ckpt"


def start_moto(workdir: Path) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    log = open(workdir / "moto.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto did not start; see {workdir / 'moto.log'}")


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


# --- 1. the stall --------------------------------------------------------------------------------

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
    stalls = [{"step": s, "stall_s": t - progress[s], "uri": uri} for s, t, uri in ckpts if s in progress]
    # The trainer also prints its own measure of the same thing (train_loop.save_checkpoint,
    # monotonic clock around save + barrier); kept beside ours as a cross-check.
    own = {}
    for line in Path(r["log"]).read_text().splitlines():
        m = re.search(r"checkpoint at step (\d+) stalled training for ([\d.]+)s", line)
        if m:
            own[int(m.group(1))] = float(m.group(2))
    for st in stalls:
        st["trainer_reported_stall_s"] = own.get(st["step"])
    ckpt_steps = {s for s, _, _ in ckpts}
    # A normal step: consecutive progress events, neither following a checkpoint nor step 1.
    steps = [progress[s] - progress[s - 1] for s in sorted(progress)
             if s - 1 in progress and s - 1 not in ckpt_steps and s > 2]
    return {"mode": mode, "stalls": stalls, "step_s_median": statistics.median(steps) if steps else None,
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


def upload_trainer_way(local: Path, endpoint: str, dest: str) -> float:
    """Ray Train V2's persist_current_checkpoint, on the trainer's S3FileSystem."""
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

    client = s3_client(endpoint)
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
    p.add_argument("--repeats", type=int, default=3, help="uploads of each kind, alternating")
    p.add_argument("--modes", default="SYNC,ASYNC")
    a = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-checkpoint-io-"))
    tokens_needed = int(a.workers * a.micro_batch * a.seq_len * a.steps * 1.5)
    assets = build_assets(a.hidden, a.layers, a.heads, a.intermediate, a.vocab, tokens_needed)
    print(f"checkpoint_io: model {assets['params'] / 1e6:.1f}M params, {a.workers} workers, "
          f"checkpoint every {a.every} of {a.steps} steps; logs in {workdir}", flush=True)
    os.environ.update(CREDENTIALS)
    moto, endpoint = start_moto(workdir)
    try:
        client = s3_client(endpoint)
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
        times: dict[str, list[float]] = {"trainer": [], "boto3": []}
        for i in range(a.repeats):
            times["trainer"].append(upload_trainer_way(local, endpoint, f"{BUCKET}/upload-trainer-{i}"))
            times["boto3"].append(upload_boto3(local, files, endpoint, f"upload-boto3-{i}"))
            # Keep moto's memory flat: each copy is deleted before the next.
            for kind in ("trainer", "boto3"):
                keys = [o["Key"] for pg in client.get_paginator("list_objects_v2").paginate(
                    Bucket=BUCKET, Prefix=f"upload-{kind}-{i}") for o in pg.get("Contents", [])]
                for k in keys:
                    client.delete_object(Bucket=BUCKET, Key=k)
    finally:
        moto.terminate()
        moto.wait(10)

    t_med, b_med = statistics.median(times["trainer"]), statistics.median(times["boto3"])
    upload = {"files": len(files), "bytes": size, "trainer_s": times["trainer"], "boto3_s": times["boto3"],
              "trainer_MBps_median": mb / t_med, "boto3_MBps_median": mb / b_med,
              "ratio_trainer_over_boto3": (mb / t_med) / (mb / b_med)}
    rows = [("trainer way (Ray persist, pyarrow S3FileSystem)", mb, t_med, mb / t_med,
             ", ".join(f"{x:.2f}" for x in times["trainer"])),
            ("boto3 TransferManager (defaults)", mb, b_med, mb / b_med,
             ", ".join(f"{x:.2f}" for x in times["boto3"]))]
    text = table(("upload of one checkpoint", "MB", "median s", "MB/s", "runs (s)"), rows)
    text += f"\n\nupload ratio trainer/boto3 (MB/s): {upload['ratio_trainer_over_boto3']:.2f} " \
            f"(goal >= 1.0: {'met' if upload['ratio_trainer_over_boto3'] >= 1.0 else 'NOT met'})"
    srows = []
    for mode, s in stalls.items():
        for st in s["stalls"]:
            srows.append((mode, st["step"], st["stall_s"], st.get("trainer_reported_stall_s"),
                          s["step_s_median"], t_med, st["stall_s"] / t_med))
    text += "\n\n" + table(("upload mode", "checkpoint step", "stall s (events)",
                            "stall s (trainer's own line)", "normal step s",
                            "upload s (trainer way, whole ckpt)", "stall / upload"), srows)
    print(text)
    path = write_results("checkpoint_io", {
        "model": assets, "settings": vars(a), "upload": upload, "stalls": stalls, "table": text,
        "goals": {"upload_ratio": ">= 1.0", "stall": "well below the upload time"},
    }, ["python", "-m", "bench", "checkpoint_io", *argv])
    print(f"results: {path}; logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
