"""`finetune plot RUN_DIR|URI`: a run's loss curve as a PNG, next to its checkpoints.

The run is the folder its checkpoints are in (<checkpoint.uri>/<job name>): a local path,
file://PATH or s3://BUCKET/PREFIX/JOB (S3 endpoint and keys from the environment, as the
trainer reads them). Reads the metrics log there; imports no torch.
"""

from __future__ import annotations

import argparse
import os
import sys


def cmd_plot(args: argparse.Namespace) -> int:
    from finetune_trainer.errors import TrainerError
    from finetune_trainer.loss_curve import render
    from finetune_trainer.storage import resolve

    def location(where: str):
        return resolve(where if "://" in where else f"file://{os.path.abspath(where)}")

    try:
        run = location(args.run)
        name = os.path.basename(run.path.rstrip("/")) or run.uri
        uri = render(run, args.title or f"{name}: loss", location(args.output) if args.output else None)
    except TrainerError as exc:
        print(f"finetune plot: error: {exc}", file=sys.stderr)
        return 1
    print(uri)
    return 0
