"""`finetune`: the command line. Each subcommand imports its heavy half lazily, so
`finetune validate` runs where only the API package is installed (a GitOps pipeline, the
operator image) and `finetune run` never loads kopf."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml

from . import API_VERSION, KIND
from .documents import check_files
from .progress_bar import ProgressBar


def _cmd_validate(args: argparse.Namespace) -> int:
    problems, checked = check_files(args.files, allow_other_kinds=args.skip_other_kinds)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {checked} document(s)", file=sys.stderr)
        return 1
    print(f"{checked} FineTuneJob document(s) valid", file=sys.stderr)
    return 0


def _load_one_job(path: str):
    from .model import FineTuneJob
    from .validation import ValidationError

    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"finetune: cannot read {path}: {exc}")
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1:
        raise SystemExit(f"finetune: {path} must hold exactly one {KIND} "
                         f"({API_VERSION}); it holds {len(jobs)}")
    try:
        return FineTuneJob.from_document(jobs[0])
    except ValidationError as exc:
        for error in exc.errors:
            print(f"{path}: {error}", file=sys.stderr)
        raise SystemExit(2)


def _cmd_run(args: argparse.Namespace) -> int:
    _load_one_job(args.job)  # fail fast, before any Ray start, on an invalid file
    command = [sys.executable, "-m", "finetune_trainer", "--job", args.job]
    if args.fresh:
        command.append("--fresh")
    env = dict(os.environ)
    if args.address:
        env["RAY_ADDRESS"] = args.address
    if sys.stdout.isatty() and not args.plain:
        return _run_with_progress_bar(command, env)
    return subprocess.call(command, env=env)


def _run_with_progress_bar(command: list[str], env: dict[str, str]) -> int:
    """In a terminal, the trainer's JSON events become a live bar; other lines still show."""
    bar = ProgressBar(sys.stdout)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            bar.feed(line)
    except KeyboardInterrupt:
        proc.terminate()
    bar.close()
    return proc.wait()


def _cmd_render(args: argparse.Namespace) -> int:
    from finetune_operator.render import render_job
    from finetune_operator.settings import Settings

    job = _load_one_job(args.job)
    settings = Settings.from_env()
    if args.image:
        settings = dataclasses.replace(settings, default_image=args.image)
    manifests = render_job(job, settings)
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False))
    return 0


def _run_operator(argv: Sequence[str]) -> int:
    from finetune_operator.main import run
    from finetune_operator.settings import Settings

    return run(Settings.from_args(argv)) or 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from finetune_trainer.tiny import build_tiny_assets

    assets = build_tiny_assets(Path(args.out))
    for key, value in assets.items():
        print(f"{key}: {value}")
    return 0


def _cmd_crd(args: argparse.Namespace) -> int:
    from .crd import render_crd, write_crd

    if args.write:
        for path in write_crd(*args.write):
            print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(render_crd())
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from .reference import render_reference

    text = render_reference()
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check FineTuneJob files offline (for CI/GitOps)")
    p.add_argument("files", nargs="+", help="YAML files, each with one or more documents")
    p.add_argument("--skip-other-kinds", action="store_true",
                   help="report documents of other kinds as skipped instead of as errors")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run a FineTuneJob on this machine (embedded Ray) or "
                                   "on RAY_ADDRESS")
    p.add_argument("job", help="the FineTuneJob file")
    p.add_argument("--fresh", action="store_true",
                   help="start from the base model instead of resuming the latest checkpoint")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--plain", action="store_true", help="no progress bar: print the log")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("render", help="print what the operator would create for a job")
    p.add_argument("job")
    p.add_argument("--image", help="trainer image when the job names none")
    p.set_defaults(func=_cmd_render)

    # `finetune operator ...` hands its flags to the operator's own parser (see main()); this
    # entry is for --help.
    sub.add_parser("operator", help="run the operator (`finetune operator --help` for its "
                                    "settings)", add_help=False)

    p = sub.add_parser("make-tiny", help="build a tiny model, tokenizer and dataset")
    p.add_argument("out", help="folder to write them to")
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("crd", help="print the FineTuneJob CRD (or write it with --write DIR)")
    p.add_argument("--write", nargs="+", metavar="DIR")
    p.set_defaults(func=_cmd_crd)

    p = sub.add_parser("docs", help="print the spec reference (Markdown) generated from the "
                                    "schema")
    p.add_argument("--write", metavar="FILE")
    p.set_defaults(func=_cmd_docs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["operator"]:
        return _run_operator(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
