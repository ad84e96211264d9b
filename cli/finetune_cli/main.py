"""`finetune`: the command line. Each subcommand imports its heavy half lazily, so
`finetune validate` runs where only the API package is installed (a GitOps pipeline, the
operator image) and `finetune run` never loads kopf."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import cmd_validate

    return cmd_validate(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import cmd_run

    return cmd_run(args)


def _cmd_render(args: argparse.Namespace) -> int:
    from .render import cmd_render

    return cmd_render(args)


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import cmd_plot

    return cmd_plot(args)


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
    from finetune_api.crd import render_crd, write_crd

    if args.write:
        for path in write_crd(*args.write):
            print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(render_crd())
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from finetune_api.reference import render_reference

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

    p = sub.add_parser("validate", help="check FineTuneJob files offline, as kubectl and the "
                                        "API server would (for CI/GitOps)")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="YAML or JSON files of one or more documents, directories of them "
                        "(*.yaml, *.yml, *.json), or - for standard input")
    p.add_argument("-R", "--recursive", action="store_true",
                   help="read the directories' subdirectories too")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="json: a list of {file, document, line, object, field, message} "
                        "(for CI annotations)")
    p.add_argument("--skip-other-kinds", action="store_true",
                   help="report documents of other kinds as skipped instead of as errors")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run a FineTuneJob on this machine (embedded Ray) or "
                                   "on RAY_ADDRESS")
    p.add_argument("job", help="the FineTuneJob file")
    p.add_argument("--fresh", action="store_true",
                   help="start from the base model instead of resuming the latest checkpoint")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--plain", action="store_true",
                   help="no progress bar: stdout is the JSON event stream, as without a terminal")
    p.add_argument("--verbose", action="store_true",
                   help="also show the log (the trainer's, Ray's and the workers' output) as it comes")
    p.add_argument("--log-file", metavar="FILE",
                   help="where the log goes (default: $XDG_STATE_HOME/finetune/logs/JOB-TIME-PID.log)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("render", help="print what the operator would create for every job "
                                      "given")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="files, directories or - (standard input), as for validate")
    p.add_argument("-R", "--recursive", action="store_true",
                   help="read the directories' subdirectories too")
    p.add_argument("--image", help="trainer image when the job names none")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("plot", help="draw a run's loss curve (PNG) next to its checkpoints")
    p.add_argument("run", metavar="RUN_DIR|URI",
                   help="the run's folder, <checkpoint.uri>/<job name>: a path, file://PATH or "
                        "s3://BUCKET/PREFIX/JOB")
    p.add_argument("-o", "--output", metavar="PNG", help="write the PNG here instead (path or URI)")
    p.add_argument("--title", help="the chart's title (default: the job's name)")
    p.set_defaults(func=_cmd_plot)

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
