"""Timing marks for the trainer's start-up, added from OUTSIDE the trainer (no trainer change).

trainer_overhead puts this directory on PYTHONPATH with BENCH_TIMING=1 for one `finetune run`;
Python imports `sitecustomize` in every process that inherits the environment (the CLI, the
trainer process, the Ray workers). When one of the modules below finishes importing, one of its
functions is wrapped so that it prints `{"bench": "<mark>", "time": <epoch s>, "pid": ...}` before
and after the call; Ray forwards worker stdout to the driver log, where the benchmark reads the
marks beside the trainer's own `started`/`progress` events. Without BENCH_TIMING nothing happens.
"""
from __future__ import annotations

import os

if os.environ.get("BENCH_TIMING") == "1":
    import functools
    import importlib.abc
    import json
    import sys
    import time

    def mark(name: str) -> None:
        sys.stdout.write(json.dumps({"bench": name, "time": time.time(), "pid": os.getpid()}) + "\n")
        sys.stdout.flush()

    def timed(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            mark(name + "_begin")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(name + "_end")
        return wrapper

    # module -> [(attribute, mark name)]
    PATCHES = {
        "finetune_trainer.launcher": [("_init_ray", "ray_init"), ("preflight", "preflight")],
        "finetune_trainer.model_io": [("local_model_dir", "train_func_data"), ("load_model", "model_load")],
        "deepspeed": [("initialize", "deepspeed_init")],
        # Ray Train calls it through the module attribute (`dist.init_process_group`).
        "torch.distributed": [("init_process_group", "process_group")],
        # A checkpoint's parts (checkpoint diagnosis): the local save, Ray's report (the upload
        # in SYNC mode), and rank 0's wait for the controller to register it.
        "finetune_trainer.checkpointing": [("save", "ckpt_save")],
        "ray.train": [("report", "ray_report"),
                      ("get_all_reported_checkpoints", "wait_registered")],
    }

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in PATCHES:
                return None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
                if spec is not None and spec.loader is not None:
                    exec_module = spec.loader.exec_module

                    def exec_and_patch(module, _exec=exec_module, _name=name):
                        _exec(module)
                        for attr, label in PATCHES[_name]:
                            if hasattr(module, attr):
                                setattr(module, attr, timed(label, getattr(module, attr)))
                    spec.loader.exec_module = exec_and_patch
                    return spec
            return None

    sys.meta_path.insert(0, _Finder())
    if os.environ.get("BENCH_TIMING_MARK_START"):
        mark(os.environ["BENCH_TIMING_MARK_START"])
