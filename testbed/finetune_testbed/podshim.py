"""One container's process, started the way a container runtime starts it.

`python -m finetune_testbed.podshim SPEC.json` (the process kubelet runs one per container):
joins the pod's network namespace, makes a mount, UTS and PID namespace of the container's
own, sets the pod's hostname, bind-mounts the pod's files over the host's (`/etc/hosts`,
`/etc/resolv.conf`, `/tmp`, the image's `/usr/local/bin`, the pod's volumes), mounts a
`/proc` of the new PID namespace (Ray's psutil reads it) and execs the container's command
as PID 1 of that namespace. So, as in a container: when PID 1 ends, the kernel kills every
other process of the container; a SIGTERM reaches PID 1 only if it handles it; SIGKILL always.

The shim stays outside, as containerd's shim does: it forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT
to PID 1, writes PID 1's host pid to `pidfile` (for SIGKILL and `nsenter` exec probes) and
exits with PID 1's status as a kubelet reports it (the code, or 128 + the signal).

The spec file holds the container's environment, Secrets included, so the kubelet writes it
0600 and the shim deletes it once read: values never appear in any process's arguments.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int) -> None:
    _check(_libc.mount(src.encode() if src else None, dst.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags), None),
           f"mount {dst}")


def _enter(spec: dict) -> None:
    fd = os.open(spec["netns"], os.O_RDONLY)
    _check(_libc.setns(fd, CLONE_NEWNET), "setns net")
    os.close(fd)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWPID), "unshare")
    # Nothing mounted here may leak back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    name = spec["hostname"].encode()
    _check(_libc.sethostname(name, len(name)), "sethostname")
    for src, dst in spec.get("mounts", []):
        # The host's tree stands in for the image's: a mount path must exist in it.
        _mount(src, dst, None, MS_BIND | MS_REC)


def main(argv: list[str]) -> int:
    with open(argv[1]) as fh:
        spec = json.load(fh)
    os.unlink(argv[1])
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Opened before the mounts, which may hide the kubelet's directory (under /tmp).
    piddir = os.open(os.path.dirname(spec["pidfile"]), os.O_RDONLY)
    pidname = os.path.basename(spec["pidfile"])
    try:
        _enter(spec)
    except OSError as exc:
        print(f"podshim: {exc}", file=sys.stderr)
        return 128
    pid = os.fork()
    if pid == 0:  # PID 1 of the container
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            _mount("proc", "/proc", "proc", 0)
            os.chdir(spec.get("cwd") or "/")
            argv_c = spec["argv"]
            os.execvpe(argv_c[0], argv_c, spec["env"])
        except OSError as exc:
            # What a runtime reports as StartError: the executable is not in the image.
            print(f"podshim: exec {spec['argv'][0]!r}: {exc.strerror}", file=sys.stderr)
            os._exit(127)
    fd = os.open(pidname + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644,
                 dir_fd=piddir)
    os.write(fd, str(pid).encode())
    os.close(fd)
    os.replace(pidname + ".tmp", pidname, src_dir_fd=piddir, dst_dir_fd=piddir)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def launch(*, netns: str, hostname: str, argv: list[str], env: dict[str, str],
           mounts: list[list[str]], workdir: Path, cwd: str = "/") -> tuple[subprocess.Popen, int | None]:
    """Start a shim for one container (or a sandboxed process without a Pod, such as the
    operator); returns the shim and PID 1's host pid. `workdir` keeps the container's log
    (`log`) and pid file."""
    workdir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / "pid1"
    pidfile.unlink(missing_ok=True)
    spec = {"netns": netns, "hostname": hostname[:63], "mounts": mounts, "argv": argv,
            "env": env, "cwd": cwd, "pidfile": str(pidfile)}
    spec_path = workdir / f"spec-{uuid.uuid4().hex[:8]}.json"
    fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(spec, fh)
    from .kubestack import _die_with_parent
    with open(workdir / "log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "finetune_testbed.podshim",
                                 str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 30
    while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, int(pidfile.read_text()) if pidfile.exists() else None


if __name__ == "__main__":
    sys.exit(main(sys.argv))
