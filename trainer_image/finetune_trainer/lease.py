"""A lease on a run's checkpoint location: one run of a job writes there at a time.

Two runs of one job into one location orphan each other's checkpoints, or one resumes from a
checkpoint the other's `keep` then deletes. So the driver takes a lease before training:
`<checkpoint uri>/<job>/_lease.json`, naming its holder (host, pid, attempt, since), created
only if absent and refreshed while the run runs, each write conditional on the last one:

- S3: conditional writes (`IfNoneMatch='*'` to create, `IfMatch=<etag>` to refresh, take over
  and delete), so of two runs racing for the lease exactly one wins;
- file://: the same operations under an exclusive `flock` of `_lease.json.lock`, a content hash
  as the etag.

A second run is refused (LeaseHeldError) naming the holder, unless the lease is stale: not
refreshed for STALE_AFTER_REFRESHES refresh intervals (the holder crashed or lost its node), or
held by a process of this same machine and pid namespace that no longer exists (a killed run
rerun in place need not wait). A stale lease is taken over, and the run says so. The holders'
clocks are compared, so nodes' clocks must agree to well within the stale time (NTP does).

One exception to refusing: a later attempt of the same job, as the operator numbers them
(ATTEMPT_ENV), waits for an earlier attempt's lease to go stale. The operator submits attempt
N+1 only once attempt N is over by Ray's account, but a driver that died with its head pod
cannot release its lease, and its workers on other pods may run on for a while (until their
raylet gives up on the lost head): waiting out the stale time is what keeps them from writing
beside the new attempt, and refusing would turn every lost head into a spent retry.
"""

from __future__ import annotations

import _thread
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from finetune_api.status import ATTEMPT_ENV, split_submission_id

from .cleanup import pid_alive
from .errors import TrainerError
from .progress import say
from .storage import Location, S3Settings, describe, s3_client

LEASE_FILE = "_lease.json"
REFRESH_ENV = "FINETUNE_LEASE_REFRESH_S"
DEFAULT_REFRESH_S = 30.0
STALE_AFTER_REFRESHES = 4


def _supersedes(ours: str, theirs: str) -> bool:
    """Whether attempt `ours` comes after attempt `theirs` of the same job (the operator's
    submission ids); False outside the operator, where no run knows of another."""
    a, b = split_submission_id(ours), split_submission_id(theirs)
    return a is not None and b is not None and a[0] == b[0] and a[1] > b[1]


class LeaseHeldError(TrainerError):
    """Another live run of the job holds the checkpoint location. Exit 1 (TrainingFailed): a
    retry after that run ends, or after its lease goes stale, succeeds."""


class LeaseLostError(TrainerError):
    """Another run took this run's lease over (this run was not refreshing it)."""


def _namespace() -> str:
    """This kernel boot and pid namespace: where a holder's pid can be checked for life."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


@dataclass
class Holder:
    host: str
    pid: int
    attempt: str
    since: str  # UTC, ISO 8601
    refreshed: float  # time.time() of the last refresh
    namespace: str = ""
    submission: str = ""  # the operator's attempt (ATTEMPT_ENV); empty outside the operator

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, attempt {self.attempt}, since {self.since}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, body: bytes) -> "Holder | None":
        try:
            doc = json.loads(body)
            return cls(**{k: doc[k] for k in ("host", "pid", "attempt", "since", "refreshed")},
                       namespace=doc.get("namespace", ""), submission=doc.get("submission", ""))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as stale


class _S3Store:
    def __init__(self, loc: Location):
        from botocore.exceptions import ClientError

        self._client_error = ClientError
        self.bucket, _, self.key = loc.path.partition("/")
        self.client = s3_client(loc.settings or S3Settings(), max_connections=2)

    def _precondition_failed(self, exc) -> bool:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # 409 ConditionalRequestConflict: a concurrent conditional write to the same key
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self._client_error as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return got["Body"].read(), got["ETag"]

    def create(self, body: bytes) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")["ETag"]
        except self._client_error as exc:
            if self._precondition_failed(exc):
                return None
            raise

    def replace(self, body: bytes, etag: str) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=etag)["ETag"]
        except self._client_error as exc:
            if self._precondition_failed(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise

    def delete(self, etag: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except self._client_error as exc:
            if not self._precondition_failed(exc):
                raise


class _FileStore:
    def __init__(self, loc: Location):
        self.path = loc.path
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def _locked(self):
        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _read(self) -> tuple[bytes | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None, None
        return body, hashlib.sha256(body).hexdigest()

    def _write(self, body: bytes) -> str:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return hashlib.sha256(body).hexdigest()

    def read(self):
        fd = self._locked()
        try:
            return self._read()
        finally:
            os.close(fd)

    def create(self, body: bytes) -> str | None:
        fd = self._locked()
        try:
            return None if self._read()[0] is not None else self._write(body)
        finally:
            os.close(fd)

    def replace(self, body: bytes, etag: str) -> str | None:
        fd = self._locked()
        try:
            return self._write(body) if self._read()[1] == etag else None
        finally:
            os.close(fd)

    def delete(self, etag: str) -> None:
        fd = self._locked()
        try:
            if self._read()[1] == etag:
                os.remove(self.path)
        finally:
            os.close(fd)


def refresh_interval() -> float:
    raw = os.environ.get(REFRESH_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_REFRESH_S
    except ValueError:
        value = -1
    if value <= 0:
        raise TrainerError(f"{REFRESH_ENV}={raw!r}: expected a positive number of seconds")
    return value


class Lease:
    """Held by the driver from `acquire` to `release`; `start_refreshing` keeps it fresh."""

    def __init__(self, store, uri: str, holder: Holder, etag: str, refresh_s: float,
                 now: Callable[[], float] = time.time):
        self._store = store
        self._now = now
        self.uri = uri
        self.holder = holder
        self._etag = etag
        self.refresh_s = refresh_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_loc: Location, attempt: str, refresh_s: float | None = None,
                now: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep
                ) -> "Lease":
        """Take the lease on `run_loc` (the job's checkpoint directory) or raise LeaseHeldError."""
        refresh_s = refresh_s or refresh_interval()
        stale_s = STALE_AFTER_REFRESHES * refresh_s
        loc = run_loc.child(LEASE_FILE)
        store = _S3Store(loc) if loc.scheme == "s3" else _FileStore(loc)
        holder = Holder(host=socket.gethostname(), pid=os.getpid(), attempt=attempt,
                        since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), refreshed=now(),
                        namespace=_namespace(), submission=os.environ.get(ATTEMPT_ENV, ""))
        waited_for: str | None = None
        give_up_at = now() + 2 * stale_s
        try:
            races = 0
            while races < 5:  # only a race with another run's create/delete loops
                etag = store.create(holder.encode())
                if etag:
                    return cls(store, loc.uri, holder, etag, refresh_s, now)
                body, current_etag = store.read()
                if body is None:
                    races += 1
                    continue  # released between our create and read
                current = Holder.decode(body)
                why = cls._stale_reason(current, now(), stale_s)
                if why is None and current is not None and _supersedes(holder.submission, current.submission) \
                        and now() < give_up_at:
                    # An earlier attempt of this job, lost with its head: wait its lease out (one
                    # still refreshing it after twice the stale time is alive: refused below).
                    if waited_for != current.submission:
                        waited_for = current.submission
                        left = max(0.0, current.refreshed + stale_s - now())
                        say(f"finetune-train: the lease on {run_loc.uri} is held by the earlier attempt "
                            f"{current.submission} ({current.describe()}); waiting up to {left:.0f}s for "
                            "it to go stale")
                    sleep(min(refresh_s, 5.0, max(0.1, current.refreshed + stale_s - now() + 0.1)))
                    continue
                if why is None:
                    age = now() - current.refreshed
                    raise LeaseHeldError(
                        f"the checkpoint location {run_loc.uri} is in use by another run of this job "
                        f"({current.describe()}; refreshed {max(age, 0):.0f}s ago); refused. If that run "
                        f"is dead, its lease goes stale {stale_s:.0f}s after its last refresh")
                holder.refreshed = now()
                etag = store.replace(holder.encode(), current_etag)
                if etag:
                    previous = current.describe() if current else "an unreadable lease"
                    say(f"finetune-train: took over the stale lease on {run_loc.uri} from {previous} ({why})")
                    return cls(store, loc.uri, holder, etag, refresh_s, now)
                races += 1
        except TrainerError:
            raise
        except Exception as exc:  # S3 unreachable after retries, permission denied
            raise TrainerError(f"cannot take the lease {loc.uri}: {describe(exc)}") from None
        raise LeaseHeldError(f"the checkpoint location {run_loc.uri}: lost the race for its lease {loc.uri} "
                             "to other runs of this job; refused")

    @staticmethod
    def _stale_reason(current: Holder | None, now: float, stale_s: float) -> str | None:
        if current is None:
            return "its content is unreadable"
        if current.namespace and current.namespace == _namespace() and not pid_alive(current.pid):
            return f"process {current.pid} on this machine is gone"
        age = now - current.refreshed
        if age > stale_s:
            return f"not refreshed for {age:.0f}s, stale after {stale_s:.0f}s"
        return None

    def refresh(self) -> bool:
        """One refresh; False when another run has taken the lease over."""
        self.holder.refreshed = self._now()
        etag = self._store.replace(self.holder.encode(), self._etag)
        if etag is None:
            body, _ = self._store.read()
            other = Holder.decode(body) if body else None
            self.lost = (f"lost the lease on the checkpoint location {self.uri} to "
                         f"{other.describe() if other else 'nobody (it was deleted)'}; stopping")
            return False
        self._etag = etag
        return True

    def start_refreshing(self, on_lost: Callable[[], None] = _thread.interrupt_main) -> None:
        """Refresh every refresh_s in a thread; on loss, record why and call on_lost (by default
        a KeyboardInterrupt in the main thread, which stops the driver's trainer.fit())."""

        def loop():
            while not self._stop.wait(self.refresh_s):
                try:
                    if not self.refresh():
                        on_lost()
                        return
                except Exception as exc:  # S3 down beyond its retries: try again next interval
                    say(f"finetune-train: cannot refresh the lease {self.uri} (will retry): {describe(exc)}")

        self._thread = threading.Thread(target=loop, daemon=True, name="finetune-lease")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            self._store.delete(self._etag)
        except Exception as exc:  # it goes stale by itself; a rerun here takes it over at once
            say(f"finetune-train: cannot release the lease {self.uri}: {describe(exc)}")
