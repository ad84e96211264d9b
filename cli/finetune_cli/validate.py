"""`finetune validate`: job files checked offline as kubectl and the API server would."""

from __future__ import annotations

import argparse
import json
import sys

from finetune_api.documents import check_sources, read_sources


def cmd_validate(args: argparse.Namespace) -> int:
    problems, checked = check_sources(read_sources(args.files, recursive=args.recursive),
                                      allow_other_kinds=args.skip_other_kinds)
    if args.output == "json":
        json.dump([p.as_dict() for p in problems], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for problem in problems:
            print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {checked} document(s)", file=sys.stderr)
        return 1
    print(f"{checked} FineTuneJob document(s) valid", file=sys.stderr)
    return 0
