"""Benchmarks of finetune-operator: `python -m bench [name] [options]` (see bench/README.md).

Every benchmark measures the project against a baseline run in the same process tree, at the
same time, on the same machine, and reports ratios: absolute figures on a shared 2-core CI box
move with the neighbours, ratios much less.
"""
