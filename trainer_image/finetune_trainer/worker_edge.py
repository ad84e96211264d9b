"""The function Ray Train runs in every worker: the training loop inside the worker's edge.

At the edge: the staging directories of dead processes on this machine are removed before
training and this process's own after it, on every exit path Python lives through; and an
exception that cannot be pickled (botocore's hold open sockets and files) is replaced by a
WorkerError carrying its type and message, since Ray pickles the worker's exception to hand
it to the driver and would otherwise report only "TypeError: cannot pickle ...".
"""

from __future__ import annotations

import pickle

from . import cleanup
from .errors import WorkerError


def portable(exc: BaseException) -> BaseException:
    """`exc` itself when it survives pickling, else a WorkerError saying the same in one line."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        message = " ".join(str(exc).split())[:500]
        return WorkerError(f"{type(exc).__module__}.{type(exc).__name__}: {message}")


def train_worker(config: dict) -> None:
    from .train_loop import train_func

    cleanup.sweep_staging()
    try:
        train_func(config)
    except Exception as exc:
        replacement = portable(exc)
        if replacement is exc:
            raise
        raise replacement from None
    finally:
        cleanup.sweep_staging(own=True)
