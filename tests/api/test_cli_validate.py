"""`finetune validate` as a pipeline runs it: a real process, exit codes, one line per error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from finetune_api.reader import dump_all

from .cases import BAD, GOOD

# The console script pip installed: what a pipeline runs.
FINETUNE = Path(sys.executable).with_name("finetune")


def run_validate(*args: str, stdin: str | bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(FINETUNE), "validate", *args], input=stdin,
                          capture_output=True, text=isinstance(stdin, (str, type(None))),
                          timeout=60)


def test_all_good_documents_pass(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(dump_all(list(GOOD.values())))
    result = run_validate(str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert f"{len(GOOD)} FineTuneJob document(s) valid" in result.stderr


def test_every_bad_document_gets_a_line_naming_document_field_and_reason(tmp_path):
    names = sorted(BAD)
    docs, labels = [], []
    for name in names:
        doc, field = BAD[name]
        if not field.startswith("metadata."):  # the case's own name is what it is about
            doc = dict(doc, metadata={"name": name})
        docs.append(doc)
        meta = doc["metadata"]
        labels.append(f"FineTuneJob/{meta.get('name') or meta.get('generateName')}")
    path = tmp_path / "bad.yaml"
    path.write_text(dump_all(docs))
    result = run_validate(str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    for index, name in enumerate(names, start=1):
        field = BAD[name][1]
        prefix = f"{path}#{index} {labels[index - 1]}: {field}: "
        assert any(line.startswith(prefix) for line in lines), (name, lines)


def test_other_kinds_are_reported_not_passed(tmp_path):
    path = tmp_path / "mixed.yaml"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    path.write_text(dump_all([GOOD["base"], secret]))
    result = run_validate(str(path))
    assert result.returncode == 1
    assert f"{path}#2 Secret/s3: not a FineTuneJob" in result.stdout
    assert run_validate("--skip-other-kinds", str(path)).returncode == 0


def test_unreadable_and_broken_files_are_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = run_validate(str(broken), str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert f"{broken}:2: not valid YAML" in result.stdout
    assert "missing.yaml: cannot read" in result.stdout
