"""Job files for `finetune run` and `finetune render`: read, admitted, or a clean exit."""

from __future__ import annotations

import sys

from finetune_api.documents import JobFileError, Source, load_jobs
from finetune_api.model import FineTuneJob

# `finetune run`'s (and the trainer's) exit code for an invalid job.
EXIT_INVALID_JOB = 2


def load_jobs_or_exit(paths: list[str], *, recursive: bool = False,
                      one: bool = False) -> list[tuple[Source, FineTuneJob]]:
    """The jobs, or every problem on stderr and exit 2 (a job refused) or 1 (a file unread)."""
    try:
        jobs = load_jobs(paths, recursive=recursive)
    except JobFileError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(EXIT_INVALID_JOB if exc.invalid else 1)
    if one and len(jobs) != 1:
        raise SystemExit(f"finetune: {paths[0]} must hold exactly one FineTuneJob; it holds "
                         f"{len(jobs)}")
    return jobs
