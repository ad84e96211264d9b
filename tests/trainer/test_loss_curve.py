"""The loss curve: which attempts' steps it draws, and `finetune plot` (no torch, no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

from finetune_trainer.loss_curve import lineage, parse_attempt, read_curve
from finetune_trainer.storage import resolve


def attempt_log(name, resumed_from, started, steps, checkpoints, eval_every=0):
    lines = [{"kind": "attempt", "attempt": name, "resumedFromStep": resumed_from, "totalSteps": 12,
              "time": started}]
    for s in steps:
        record = {"kind": "step", "step": s, "time": started + s, "loss": 3.0 - 0.1 * s + 0.01 * started,
                  "learning_rate": 1e-3}
        if eval_every and s % eval_every == 0:
            record["eval_loss"] = 3.1 - 0.1 * s
        lines.append(record)
        if s in checkpoints:
            lines.append({"kind": "checkpoint", "step": s, "time": started + s})
    return "\n".join(json.dumps(r) for r in lines) + "\n"


def write_run(tmp_path, logs):
    metrics = tmp_path / "run" / "metrics"
    metrics.mkdir(parents=True)
    for name, text in logs.items():
        (metrics / f"{name}.jsonl").write_text(text)
    return tmp_path / "run"


RUN = {
    # crashed after step 5; its steps 4-5 are superseded by the attempt resuming from step 3
    "a": attempt_log("a", 0, 100, range(1, 6), {3}),
    "b": attempt_log("b", 3, 200, range(4, 9), {6, 8}, eval_every=2),
    # a --fresh attempt that died before its first checkpoint: not on the way to the newest
    "c": attempt_log("c", 0, 300, range(1, 3), set()) + '{"kind": "step", "st',  # cut short
    "d": attempt_log("d", 6, 400, range(7, 13), {9, 12}),
}


def test_the_curve_follows_the_checkpoints_each_attempt_resumed_from(tmp_path):
    curve = read_curve(resolve(f"file://{write_run(tmp_path, RUN)}"))
    assert [a.name for a in curve.attempts] == ["a", "b", "d"]
    steps, losses = curve.series("loss")
    assert steps == list(range(1, 13))
    assert losses[2] == 3.0 - 0.3 + 1.0 and losses[3] == 3.0 - 0.4 + 2.0  # step 4 is b's, not a's
    assert curve.series("eval_loss")[0] == [4, 6]  # b's eval past its last kept step (8) is gone
    assert curve.checkpoints == [3, 6, 9, 12]
    # A --fresh attempt starts a curve of its own.
    fresh = lineage([parse_attempt(n, t) for n, t in RUN.items()] + [parse_attempt(
        "e", attempt_log("e", 0, 500, range(1, 4), {3}))])
    assert [a.name for a in fresh.attempts] == ["e"]


def test_finetune_plot_writes_the_png_next_to_the_checkpoints_without_torch(tmp_path):
    run = write_run(tmp_path, RUN)
    code = ("import sys\nfrom finetune_cli.main import main\nrc = main(['plot', sys.argv[1]])\n"
            "assert 'torch' not in sys.modules, 'finetune plot imported torch'\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    png = run / "loss-curve.png"
    assert done.stdout.strip() == f"file://{png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    empty = tmp_path / "not-a-run"
    empty.mkdir()
    refused = subprocess.run([sys.executable, "-m", "finetune_cli", "plot", str(empty)], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"finetune plot: error: no metrics log in file://{empty}/metrics/: not a run folder "
        "(<checkpoint.uri>/<job name>), or no step done yet"]
