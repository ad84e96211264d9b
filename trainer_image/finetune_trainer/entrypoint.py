"""`finetune-train`: run one FineTuneJob with Ray Train (see launcher.run_job)."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def load_job(args):
    """The job from --job FILE or $FINETUNE_JOB (YAML or JSON text), read as kubectl reads
    it (finetune_api.reader: one-line problems naming the field)."""
    from finetune_api.model import FineTuneJob
    from finetune_api.reader import read_one
    from finetune_api.status import JOB_ENV

    if args.job:
        try:
            with open(args.job, "rb") as f:
                data: bytes | str = f.read()
        except OSError as exc:
            raise FileNotFoundError(f"cannot read job file {args.job}: {exc.strerror}") from None
        source = args.job
    elif os.environ.get(JOB_ENV):
        data, source = os.environ[JOB_ENV], JOB_ENV
    else:
        raise FileNotFoundError(f"no job given: pass --job FILE or set {JOB_ENV}")
    return FineTuneJob.from_document(read_one(data, source))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-train", description=__doc__)
    parser.add_argument("--job", help="FineTuneJob YAML/JSON file (default: $FINETUNE_JOB)")
    parser.add_argument("--fresh", action="store_true",
                        help="start from the base model even if the run has checkpoints "
                             "(default: resume; also FINETUNE_FRESH=1)")
    args = parser.parse_args(argv)
    fresh = args.fresh or os.environ.get("FINETUNE_FRESH", "") in ("1", "true", "yes")

    from .errors import InvalidJobError
    from .launcher import fail, run_job

    try:
        job = load_job(args)
    except Exception as exc:  # ValidationError lists every bad field in its message
        return fail(InvalidJobError.reason, " ".join(str(exc).split()), InvalidJobError.exit_code)
    return run_job(job, fresh=fresh)


if __name__ == "__main__":
    sys.exit(main())
