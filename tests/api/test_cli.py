"""`finetune validate`, `render` and `run` as a user and a pipeline run them: the installed
console script in a real process, reading files, directories and standard input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_api.reader import dump_all

from .cases import GOOD, TEXT_BAD, job_text, make

FINETUNE = Path(sys.executable).with_name("finetune")
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
          "stringData": {"AWS_ACCESS_KEY_ID": "x"}}


def finetune(*args: str, stdin: str | bytes | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess:
    return subprocess.run([str(FINETUNE), *args], input=stdin, capture_output=True,
                          timeout=120, cwd=cwd)


def out(result: subprocess.CompletedProcess) -> str:
    return result.stdout.decode()


def err(result: subprocess.CompletedProcess) -> str:
    return result.stderr.decode()


def test_the_issue_s_job_validates_written_as_yaml_and_as_json(tmp_path):
    (tmp_path / "job.yaml").write_text(job_text("learningRate: 3e-3\n    maxSteps: 1e3"))
    (tmp_path / "job.json").write_text(json.dumps(make(**{"spec.training.learningRate": 3e-3})))
    result = finetune("validate", str(tmp_path / "job.yaml"), str(tmp_path / "job.json"))
    assert result.returncode == 0, out(result) + err(result)
    assert "2 FineTuneJob document(s) valid" in err(result)


def test_standard_input_as_after_kustomize_build():
    stream = dump_all([SECRET, GOOD["base"], make(**{"spec.resources.workers": 0})])
    result = finetune("validate", "--skip-other-kinds", "-", stdin=stream.encode())
    assert result.returncode == 1
    assert out(result).splitlines() == [
        "<stdin>#3 FineTuneJob/case: spec.resources.workers: Invalid value: 0: must be "
        "greater than or equal to 1"]


def test_directories_are_read_and_R_recurses(tmp_path):
    (tmp_path / "a.yaml").write_text(job_text(name="a"))
    (tmp_path / "b.yml").write_text(job_text(name="b"))
    (tmp_path / "c.json").write_text(json.dumps(make(metadata={"name": "c"})))
    (tmp_path / "notes.txt").write_text("not a job")
    (tmp_path / "kustomize").mkdir()
    (tmp_path / "kustomize" / "d.yaml").write_text(job_text("maxSteps: 0", name="d"))
    flat = finetune("validate", str(tmp_path))
    assert flat.returncode == 0, out(flat)
    assert "3 FineTuneJob document(s) valid" in err(flat)
    deep = finetune("validate", "-R", str(tmp_path))
    assert deep.returncode == 1
    assert out(deep).splitlines() == [
        f"{tmp_path}/kustomize/d.yaml#1 FineTuneJob/d: spec.training.maxSteps: Invalid value: "
        "0: must be greater than or equal to 1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = finetune("validate", str(empty))
    assert result.returncode == 1 and "no .yaml, .yml, .json files" in out(result)


def test_json_output_for_ci_annotations(tmp_path):
    text = job_text("maxSteps: 10\n    seed: 1\n    maxSteps: 20\n    microBatchSize: 0")
    (tmp_path / "dup.yaml").write_text(text)
    (tmp_path / "bad.yaml").write_text(job_text("microBatchSize: 0", name="bad"))
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    result = finetune("validate", "-o", "json", str(tmp_path / "dup.yaml"),
                      str(tmp_path / "bad.yaml"), str(tmp_path / "broken.yaml"))
    assert result.returncode == 1
    listed = json.loads(out(result))
    assert listed == [
        {"file": str(tmp_path / "dup.yaml"), "document": 1, "line": 11,
         "object": "FineTuneJob/case", "field": "spec.training.maxSteps",
         "message": "duplicate key 'maxSteps' (first at line 9): strict field validation, "
                    "kubectl apply's default, refuses it"},
        {"file": str(tmp_path / "bad.yaml"), "document": 1, "line": 9,
         "object": "FineTuneJob/bad", "field": "spec.training.microBatchSize",
         "message": "Invalid value: 0: must be greater than or equal to 1"},
        {"file": str(tmp_path / "broken.yaml"), "document": None, "line": 2, "object": None,
         "field": None, "message": "not valid YAML: did not find expected ',' or ']' "
                                   "(while parsing a flow sequence)"},
    ]
    assert "3 problem(s)" in err(result)


def test_every_bad_file_is_refused_in_one_line_without_a_traceback(tmp_path):
    paths = {}
    for name, (text, _, _, _) in TEXT_BAD.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_bytes(text if isinstance(text, bytes) else text.encode())
    result = finetune("validate", *map(str, paths.values()))
    assert result.returncode == 1
    assert "Traceback" not in err(result)
    lines = out(result).splitlines()
    for name, (_, field, words, _) in TEXT_BAD.items():
        mine = [line for line in lines if line.startswith(f"{paths[name]}:")
                or line.startswith(f"{paths[name]}#")]
        assert any(words in line and (field is None or f": {field}" in line)
                   for line in mine), (name, mine)
    assert len(lines) == sum(1 for line in lines if line.startswith(str(tmp_path)))


def test_render_renders_every_job_of_every_document(tmp_path):
    (tmp_path / "two.yaml").write_text(dump_all([SECRET, make(metadata={"name": "first"}),
                                                 make(metadata={"name": "second"})]))
    third = json.dumps(make(metadata={"name": "third"}))
    result = finetune("render", "--image", "registry.example/trainer:1",
                      str(tmp_path / "two.yaml"), "-", stdin=third.encode())
    assert result.returncode == 0, err(result)
    manifests = list(yaml.safe_load_all(out(result)))
    assert [(m["kind"], m["metadata"]["name"]) for m in manifests] == [
        ("RayCluster", "first"), ("RayCluster", "second"), ("RayCluster", "third")]


def test_render_and_run_refuse_an_invalid_job_before_anything_starts(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(job_text("learningRate: .nan"))
    for command in ("render", "run"):
        result = finetune(command, str(path))
        assert result.returncode == 2, (command, err(result))
        assert err(result).splitlines() == [
            f"{path}#1 FineTuneJob/case: spec.training.learningRate: Invalid value: .nan: "
            "JSON has no NaN or infinity, so kubectl cannot send it"]
    result = finetune("render", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1 and "missing.yaml: cannot read" in err(result)
