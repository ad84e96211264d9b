"""The loss curve of a run as a PNG, from the metrics log the trainer keeps next to the
checkpoints (`<run>/metrics/<attempt>.jsonl`, metrics.py).

Train and eval loss against the optimizer step, the checkpoints marked, and each attempt of
the run shaded with where it resumed. Only the attempts whose steps lead to the newest one are
drawn: a resumed attempt continues from the checkpoint an earlier attempt wrote (what that one
logged past the checkpoint is superseded), a --fresh attempt starts a curve of its own.

Used by the trainer's driver at the end of a run and by `finetune plot`; imports no torch.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from .errors import BadInputError
from .metrics import JSONL_DIR
from .storage import Location, describe

PNG_NAME = "loss-curve.png"


@dataclass
class Attempt:
    name: str
    resumed_from: int
    started: float
    steps: dict[int, dict] = field(default_factory=dict)  # step -> its metrics
    checkpoints: list[int] = field(default_factory=list)


@dataclass
class Curve:
    """The lineage of attempts that leads to the newest, oldest first, each trimmed to the
    steps that count."""
    attempts: list[Attempt]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = sorted((s, m[key]) for a in self.attempts for s, m in a.steps.items() if key in m)
        return [s for s, _ in points], [v for _, v in points]

    @property
    def checkpoints(self) -> list[int]:
        return sorted({c for a in self.attempts for c in a.checkpoints})


def parse_attempt(name: str, text: str) -> Attempt | None:
    attempt: Attempt | None = None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed attempt
        kind = record.get("kind") if isinstance(record, dict) else None
        if kind == "attempt":
            attempt = Attempt(name, int(record.get("resumedFromStep") or 0), float(record.get("time") or 0))
        elif attempt is None:
            continue
        elif kind == "step" and isinstance(record.get("step"), int):
            attempt.steps[record["step"]] = {k: v for k, v in record.items()
                                             if k not in ("kind", "step", "time") and isinstance(v, (int, float))}
        elif kind == "checkpoint" and isinstance(record.get("step"), int):
            attempt.checkpoints.append(record["step"])
    return attempt


def lineage(attempts: list[Attempt]) -> Curve:
    """The newest attempt and, back from it, the attempt that wrote each checkpoint resumed from."""
    ordered = sorted(attempts, key=lambda a: (a.started, a.name))
    if not ordered:
        return Curve([])
    chain = [ordered[-1]]
    limit = ordered[-1].resumed_from
    for earlier in reversed(ordered[:-1]):
        if limit == 0:
            break
        if limit in earlier.checkpoints:
            chain.append(earlier)
            limit = earlier.resumed_from
    trimmed = []
    for i, a in enumerate(reversed(chain)):
        # Up to the checkpoint the next attempt resumed from; the newest keeps all it logged.
        upto = chain[-(i + 2)].resumed_from if i + 1 < len(chain) else None
        keep = {s: m for s, m in a.steps.items() if upto is None or s <= upto}
        trimmed.append(Attempt(a.name, a.resumed_from, a.started, keep,
                               [c for c in a.checkpoints if upto is None or c <= upto]))
    return Curve(trimmed)


def read_curve(run: Location) -> Curve:
    """The run's curve from its metrics log; BadInputError when the run has none."""
    base = f"{run.path.rstrip('/')}/{JSONL_DIR}"
    try:
        infos = run.filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        attempts = []
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(".jsonl"):
                continue
            with run.filesystem.open_input_stream(info.path) as f:
                attempt = parse_attempt(info.base_name[:-len(".jsonl")], f.read().decode())
            if attempt is not None:
                attempts.append(attempt)
    except OSError as exc:
        raise BadInputError(f"cannot read the metrics log {run.uri}/{JSONL_DIR}: {describe(exc)}") from None
    if not attempts:
        raise BadInputError(f"no metrics log in {run.uri}/{JSONL_DIR}/: not a run folder "
                            "(<checkpoint.uri>/<job name>), or no step done yet")
    return lineage(attempts)


def draw(curve: Curve, title: str) -> bytes:
    """The PNG: loss against step, checkpoints marked, attempts shaded."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also where matplotlib was imported before
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    shades = ("#f2f2f2", "#dfe8f5")
    # Attempts are shaded only where there is more than one: resumes are what the eye should find.
    for i, a in enumerate(curve.attempts if len(curve.attempts) > 1 else []):
        steps = sorted(a.steps)
        if not steps:
            continue
        lo, hi = a.resumed_from, steps[-1]
        label = "attempt 1" if i == 0 else f"attempt {i + 1}, resumed at step {a.resumed_from}"
        ax.axvspan(lo, hi, color=shades[i % 2], zorder=0, label=label)
        if i > 0:
            ax.axvline(lo, color="#555555", linestyle="--", linewidth=1, zorder=1)
    x, y = curve.series("loss")
    ax.plot(x, y, color="#1f77b4", linewidth=1.8, marker="." if len(x) <= 60 else None, label="train loss",
            zorder=3)
    ex, ey = curve.series("eval_loss")
    if ex:
        ax.plot(ex, ey, color="#d62728", linewidth=1.8, marker="o", markersize=5, label="eval loss", zorder=4)
    losses = dict(zip(x, y))
    marks = [c for c in curve.checkpoints if c in losses]
    if marks:
        ax.scatter(marks, [losses[c] for c in marks], marker="D", s=46, facecolor="white", edgecolor="#2ca02c",
                   linewidth=1.8, label="checkpoint", zorder=5)
    if y:
        ax.annotate(f"{y[-1]:.3f}", (x[-1], y[-1]), textcoords="offset points", xytext=(-4, 9), ha="right",
                    fontsize=9, color="#1f77b4")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render(run: Location, title: str, out: Location | None = None) -> str:
    """Draw the run's curve into `out` (default: loss-curve.png in the run folder); its URI."""
    png = draw(read_curve(run), title)
    out = out or run.child(PNG_NAME)
    try:
        if out.scheme == "file":
            import os

            os.makedirs(os.path.dirname(out.path) or ".", exist_ok=True)
        with out.filesystem.open_output_stream(out.path) as f:
            f.write(png)
    except OSError as exc:
        raise BadInputError(f"cannot write {out.uri}: {describe(exc)}") from None
    return out.uri
