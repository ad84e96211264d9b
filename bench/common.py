"""What every benchmark shares: machine/version facts, percentiles, /proc sampling, tables
and the results file."""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from finetune_testbed.ports import free_port  # noqa: F401  (the benchmarks' one port picker)

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "cpu_model": model,
            "mem_total_gb": round(mem_kb / 1024 / 1024, 1), "hostname": socket.gethostname(),
            "loadavg_at_start": os.getloadavg()}


def versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """Versions of what the figures depend on; importing only what is installed."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "ray", "deepspeed", "kopf", "kmock", "aiohttp", "pyarrow", "boto3",
                 "moto", "transformers", *extra):
        try:
            from importlib import metadata
            out[name] = metadata.version(name)
        except Exception:  # noqa: BLE001 - absent is a fact worth recording, not an error
            out[name] = None
    return out


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100): a p99 of 100 samples is the 99th value, no
    interpolation that would invent a latency nobody saw."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-p * len(ordered) // 100)))  # ceil(p/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


def ratio(ours: float | None, base: float | None) -> float | None:
    if ours is None or base is None or base == 0:
        return None
    return ours / base


# --- /proc readings of another process ------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of a process (its own threads, not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" the fields start at index 3 (state); utime is field 14, stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


# --- output --------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str = "") -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def git_state() -> dict[str, Any]:
    """The commit and the uncommitted files the figures were measured on (the project is being
    finished while it is measured)."""
    import subprocess

    def run(*argv: str) -> str:
        try:
            # rstrip only: porcelain lines start with a space (" M path").
            return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [line[3:] for line in run("git", "status", "--porcelain").splitlines()
               if not line[3:].startswith("bench/")]
    return {"head": run("git", "rev-parse", "HEAD").strip(), "uncommitted": changed}


def write_results(name: str, payload: dict[str, Any], command: Sequence[str]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(command),
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def summary(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "mean": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values)}
