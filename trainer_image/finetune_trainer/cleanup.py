"""What failed or killed attempts leave behind, and its removal.

- Checkpoint directories that Ray Train never registered: a partial upload (an S3 outage, a
  full disk) or one from an attempt killed mid-upload. Ray never hands them to a rerun (it
  resumes only from its own record, checkpoint_manager_snapshot.json) and its `keep` never
  deletes them, so without this they stay forever. The driver removes them before training,
  while it holds the run's lease (no other run of the job is writing there), together with the
  S3 multipart uploads left incomplete under the run.
- Local staging directories (`finetune-ckpt-rank<r>-<pid>-*`, `finetune-restore-rank<r>-<pid>-*`,
  full shards each): a worker removes its own on every exit it lives through, and, starting,
  those of processes of its machine that no longer exist (SIGKILL, OOM).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import pyarrow.fs as pafs

from .progress import say
from .storage import Location, S3Settings, describe, s3_client

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of registered checkpoints
CHECKPOINT_PREFIX = "checkpoint_"
STAGING_RE = re.compile(r"^finetune-(ckpt|restore)-rank\d+-(\d+)-")


def staging_prefix(kind: str, rank: int) -> str:
    """tempfile prefix of a rank's staging directory: kind "ckpt" or "restore"; the pid lets a
    later run tell a dead process's leftovers from a live one's."""
    return f"finetune-{kind}-rank{rank}-{os.getpid()}-"


def registered_checkpoints(run_loc: Location) -> set[str] | None:
    """Names of the checkpoint directories Ray Train registered for this run; an empty set
    when it has no record; None when the record cannot be read (then nothing is removed)."""
    path = f"{run_loc.path}/{SNAPSHOT_FILE}"
    try:
        if run_loc.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return set()
        with run_loc.filesystem.open_input_stream(path) as f:
            doc = json.loads(f.read().decode())
        results = list(doc["checkpoint_results"]) + list(doc.get("pending_training_results") or [])
        if doc.get("latest_checkpoint_result"):
            results.append(doc["latest_checkpoint_result"])
        return {r["checkpoint_dir_name"] for r in results}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        say(f"finetune-train: not removing unregistered checkpoints: cannot read {run_loc.uri}/{SNAPSHOT_FILE}: "
            f"{describe(exc)}")
        return None


def remove_unregistered_checkpoints(run_loc: Location) -> list[str]:
    """Delete the run's checkpoint directories that Ray Train did not register; their names.
    Only while holding the run's lease."""
    registered = registered_checkpoints(run_loc)
    if registered is None:
        return []
    try:
        entries = run_loc.filesystem.get_file_info(pafs.FileSelector(run_loc.path, allow_not_found=True))
    except OSError as exc:
        say(f"finetune-train: cannot list {run_loc.uri} for unregistered checkpoints: {describe(exc)}")
        return []
    removed = []
    for entry in entries:
        name = entry.base_name
        if entry.type != pafs.FileType.Directory or not name.startswith(CHECKPOINT_PREFIX) or name in registered:
            continue
        try:
            run_loc.filesystem.delete_dir(entry.path)
        except OSError as exc:
            say(f"finetune-train: cannot remove the unregistered checkpoint {run_loc.uri}/{name}: {describe(exc)}")
            continue
        removed.append(name)
        say(f"finetune-train: removed {run_loc.uri}/{name}: never registered (a partial upload, or the "
            "attempt that wrote it did not finish)")
    if run_loc.scheme == "s3":
        abort_incomplete_uploads(run_loc)
    return removed


def abort_incomplete_uploads(run_loc: Location) -> int:
    """Abort the S3 multipart uploads left under the run (their parts are stored, and billed,
    until aborted). Returns how many."""
    bucket, _, prefix = run_loc.path.partition("/")
    client = s3_client(run_loc.settings or S3Settings(), max_connections=2)
    aborted = 0
    try:
        pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        for page in pages:
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
    except Exception as exc:  # not fatal: a later run tries again
        say(f"finetune-train: cannot abort incomplete uploads under {run_loc.uri}: {describe(exc)}")
    if aborted:
        say(f"finetune-train: aborted {aborted} incomplete multipart upload(s) under {run_loc.uri}")
    return aborted


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_staging(root: str | None = None, own: bool = False) -> list[str]:
    """Remove staging directories in `root` (the temp directory) of processes that are gone,
    or with own=True this process's. Returns the paths removed."""
    root = root or tempfile.gettempdir()
    me = os.getpid()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        match = STAGING_RE.match(name)
        if not match:
            continue
        pid = int(match.group(2))
        if (pid == me) if own else (pid != me and not pid_alive(pid)):
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
