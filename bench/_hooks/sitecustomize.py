"""Timing marks for the trainer's start-up, added from OUTSIDE the trainer (no trainer change).

trainer_overhead puts this directory on PYTHONPATH with BENCH_TIMING=1 for one `finetune run`;
Python imports `sitecustomize` in every process that inherits the environment (the CLI, the
trainer process, the Ray workers). When one of the modules below finishes importing, one of its
functions is wrapped so that it prints `{"bench": "<mark>", "time": <epoch s>, "pid": ...}` before
and after the call; Ray forwards worker stdout to the driver log, where the benchmark reads the
marks beside the trainer's own `started`/`progress` events. With BENCH_MEMORY=1 (lora_vs_full) it
also prints the prepared model's trainable parameters and, when training ends, each rank's
optimizer-state bytes and peak RSS (and, for model_memory, the peak RSS when setup ends and after
the final model). Without BENCH_TIMING or BENCH_MEMORY nothing happens.
"""
from __future__ import annotations

import os

if os.environ.get("BENCH_TIMING") == "1" or os.environ.get("BENCH_MEMORY") == "1":
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

    def record(name: str, **fields) -> None:
        sys.stdout.write(json.dumps({"bench": name, "time": time.time(), "pid": os.getpid(), **fields}) + "\n")
        sys.stdout.flush()

    def reports_trainable(fn):
        """model_prep.prepare_model: the prepared model's trainable and total parameters, before
        any strategy partitions or flattens them (bench/lora_vs_full)."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            prep = fn(*args, **kwargs)
            params = list(prep.model.parameters())
            record("params", trainable=sum(p.numel() for p in params if p.requires_grad),
                   total=sum(p.numel() for p in params))
            return prep
        return wrapper

    def _optimizer_state_bytes(strategy) -> int:
        import torch

        # FSDP's torch AdamW, or the one DeepSpeed's ZeRO optimizer wraps (over its fp32 partitions).
        opt = getattr(strategy, "optimizer", None) or strategy.engine.optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                   if torch.is_tensor(t))

    def _cuda_peak_bytes():
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated()

    def _peak_rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    def patch_trainer(cls):
        """train_loop.Trainer: each rank's optimizer-state bytes and peak RSS when training ends
        (lora_vs_full); its peak RSS when setup ends (the load phase) and after the final model
        (the run phase), and the file the trainer was imported from (model_memory)."""
        setup, finish = cls.setup, cls.finish

        @functools.wraps(setup)
        def setup_wrapper(self, *args, **kwargs):
            out = setup(self, *args, **kwargs)
            record("rss", phase="load", rank=self.rank, peak_rss_kb=_peak_rss_kb(), cuda_peak_bytes=_cuda_peak_bytes())
            record("code", rank=self.rank, file=sys.modules[cls.__module__].__file__)
            return out

        @functools.wraps(finish)
        def wrapper(self, *args, **kwargs):
            record("memory", rank=self.rank, optimizer_state_bytes=_optimizer_state_bytes(self.strategy),
                   peak_rss_kb=_peak_rss_kb())
            out = finish(self, *args, **kwargs)
            record("rss", phase="run", rank=self.rank, peak_rss_kb=_peak_rss_kb(), cuda_peak_bytes=_cuda_peak_bytes())
            return out
        cls.setup, cls.finish = setup_wrapper, wrapper
        return cls

    if os.environ.get("BENCH_MEMORY") == "1":
        PATCHES_OTHER = {"finetune_trainer.model_prep": [("prepare_model", reports_trainable)],
                         "finetune_trainer.train_loop": [("Trainer", patch_trainer)]}
    else:
        PATCHES_OTHER = {}

    if os.environ.get("BENCH_TIMING") != "1":
        PATCHES = {}

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in PATCHES and name not in PATCHES_OTHER:
                return None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
                if spec is not None and spec.loader is not None:
                    exec_module = spec.loader.exec_module

                    def exec_and_patch(module, _exec=exec_module, _name=name):
                        _exec(module)
                        for attr, label in PATCHES.get(_name, ()):
                            if hasattr(module, attr):
                                setattr(module, attr, timed(label, getattr(module, attr)))
                        for attr, wrap in PATCHES_OTHER.get(_name, ()):
                            if hasattr(module, attr):
                                setattr(module, attr, wrap(getattr(module, attr)))
                    spec.loader.exec_module = exec_and_patch
                    return spec
            return None

    sys.meta_path.insert(0, _Finder())
    if os.environ.get("BENCH_TIMING_MARK_START"):
        mark(os.environ["BENCH_TIMING_MARK_START"])
