"""`finetune render FILE...`: what the operator would create for every job given."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from finetune_api.reader import dump_all

from .jobs import load_jobs_or_exit


def cmd_render(args: argparse.Namespace) -> int:
    from finetune_operator.render import render_job
    from finetune_operator.settings import Settings

    jobs = load_jobs_or_exit(args.files, recursive=args.recursive)
    settings = Settings.from_env()
    if args.image:
        settings = dataclasses.replace(settings, default_image=args.image)
    manifests = [manifest for _, job in jobs for manifest in render_job(job, settings)]
    sys.stdout.write(dump_all(manifests))  # as kubectl will read it back
    return 0
