"""The two images, checked without a Docker engine: what they copy, what they run, and that
the operator image stays free of the ML stack."""
from __future__ import annotations

import fnmatch
import glob
import os
import re
import shlex
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OPERATOR_DOCKERFILE = REPO / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
DOCKERFILES = [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ML_STACK = {"torch", "ray", "deepspeed", "transformers"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, f"{dockerfile}: dangling line continuation"
    return out


def copy_sources(dockerfile: Path) -> list[list[str]]:
    """The build-context sources of each COPY (COPY --from=stage copies between stages)."""
    result = []
    for keyword, args in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(args)):
            continue
        result.append(words[:-1])
    return result


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore: patterns in order, the last match wins, a parent's match
    counts for its children, `!` re-includes."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            excluded = not negate
    return excluded


def entrypoint(dockerfile: Path) -> list[str]:
    (args,) = [a for k, a in instructions(dockerfile) if k == "ENTRYPOINT"][-1:]
    return yaml.safe_load(args)  # the exec form is a JSON array


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_copied_path_is_in_the_repo_and_the_build_context(dockerfile):
    copies = copy_sources(dockerfile)
    assert copies
    for sources in copies:
        found = []
        for source in sources:
            matches = glob.glob(str(REPO / source.rstrip("/")))
            # A glob like README.m[d] is optional by design; a plain path must exist.
            assert matches or glob.has_magic(source), f"{dockerfile.name}: COPY {source}: missing"
            for match in matches:
                rel = os.path.relpath(match, REPO)
                assert not dockerignored(rel), f"{dockerfile.name}: COPY {rel}: .dockerignore'd"
                found.append(rel)
        assert found, f"{dockerfile.name}: COPY {sources} copies nothing"


def test_dockerignore_keeps_the_context_small():
    for path in (".venv/bin/python", ".git/HEAD", "tests/chart/test_chart.py", "charts",
                 "operator/finetune_operator/__pycache__/main.cpython-311.pyc"):
        assert dockerignored(path), path
    for path in ("pyproject.toml", "cli/finetune_cli/main.py",
                 "trainer_image/finetune_trainer/entrypoint.py"):
        assert not dockerignored(path), path


def test_entrypoints_are_console_scripts():
    scripts = PYPROJECT["project"]["scripts"]
    assert entrypoint(OPERATOR_DOCKERFILE) == ["finetune", "operator"]
    trainer = entrypoint(TRAINER_DOCKERFILE)
    assert trainer[-1] == "finetune-train"
    for script in ("finetune", "finetune-train"):
        module, _, func = scripts[script].partition(":")
        code = f"import importlib; assert callable(getattr(importlib.import_module({module!r}), {func!r}))"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _run_cli_capturing_settings(monkeypatch, argv):
    import finetune_operator.main
    from finetune_cli import main as cli

    seen = []
    monkeypatch.setattr(finetune_operator.main, "run", lambda settings: seen.append(settings))
    assert cli.main(argv) == 0
    (settings,) = seen
    return settings


def test_image_entrypoint_runs_the_operator_from_env(monkeypatch):
    """The Deployment runs the ENTRYPOINT `finetune operator` with no arguments: every
    setting comes from the chart's FINETUNE_OPERATOR_* env."""
    monkeypatch.setenv("FINETUNE_OPERATOR_DEFAULT_IMAGE", "registry.example/trainer:9")
    monkeypatch.setenv("FINETUNE_OPERATOR_NAMESPACES", "team-a,team-b")
    settings = _run_cli_capturing_settings(monkeypatch, ["operator"])
    assert settings.default_image == "registry.example/trainer:9"
    assert settings.namespaces == ("team-a", "team-b")


def test_image_entrypoint_passes_flags_to_the_operator(monkeypatch):
    """`docker run IMAGE --namespace team-a` appends flags to `finetune operator`."""
    monkeypatch.delenv("FINETUNE_OPERATOR_NAMESPACES", raising=False)
    settings = _run_cli_capturing_settings(monkeypatch, ["operator", "--namespace", "team-a"])
    assert settings.namespaces == ("team-a",)


def test_operator_extra_has_no_ml_stack():
    extra = PYPROJECT["project"]["optional-dependencies"]["operator"]
    base = PYPROJECT["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in extra + base}
    assert not names & ML_STACK, names & ML_STACK


def test_operator_modules_do_not_import_the_ml_stack():
    code = ("import sys, finetune_operator.main, finetune_cli.main; "
            f"bad = {sorted(ML_STACK)!r}; "
            "loaded = [m for m in bad if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_operator_dockerfile_installs_the_operator_extra_only():
    runs = " ".join(a for k, a in instructions(OPERATOR_DOCKERFILE) if k == "RUN")
    assert "'.[operator]'" in runs
    assert "trainer" not in runs and "torch" not in runs.replace("'torch', ", "")
    froms = [a for k, a in instructions(OPERATOR_DOCKERFILE) if k == "FROM"]
    args = dict(a.split("=", 1) for k, a in instructions(OPERATOR_DOCKERFILE) if k == "ARG")
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)


def _user(dockerfile: Path) -> str:
    return [a for k, a in instructions(dockerfile) if k == "USER"][-1]


def test_operator_image_user_matches_the_chart():
    uid, gid = _user(OPERATOR_DOCKERFILE).split(":")
    values = yaml.safe_load((REPO / "charts/finetune-operator/values.yaml").read_text())
    assert int(uid) == values["podSecurityContext"]["runAsUser"] != 0
    assert int(gid) == values["podSecurityContext"]["runAsGroup"]


def test_trainer_image_runs_as_a_non_root_user_ray_can_use():
    uid, _ = _user(TRAINER_DOCKERFILE).split(":")
    # Ray's images use uid 1000 (`ray`) with a writable home for Ray's session files.
    assert uid == "1000"
    text = TRAINER_DOCKERFILE.read_text()
    assert "--create-home --home-dir /home/ray" in text and "HOME=/home/ray" in text


def test_trainer_pins_agree_with_the_project():
    args = {}
    for keyword, value in instructions(TRAINER_DOCKERFILE):
        if keyword == "ARG" and "=" in value:
            key, _, default = value.partition("=")
            args[key] = default.strip('"')
    makefile_torch = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_torch
    trainer_extra = PYPROJECT["project"]["optional-dependencies"]["trainer"]
    (deepspeed,) = [r for r in trainer_extra if r.startswith("deepspeed")]
    assert deepspeed == f"deepspeed=={args['DEEPSPEED_VERSION']}"
    assert "cuda" in args["BASE_IMAGE"] and "devel" in args["BASE_IMAGE"]
    assert args["TORCH_INDEX_URL"].endswith("/cu" + re.search(
        r"cuda:(\d+)\.(\d+)", args["BASE_IMAGE"]).expand(r"\1\2"))


def test_trainer_prebuilds_deepspeed_ops():
    runs = [a for k, a in instructions(TRAINER_DOCKERFILE) if k == "RUN"]
    (ds,) = [r for r in runs if "deepspeed==" in r]
    for flag in ("DS_BUILD_CPU_ADAM=1", "DS_BUILD_FUSED_ADAM=1", "DS_ACCELERATOR=cuda"):
        assert flag in ds
    assert "--no-build-isolation" in ds
    installs = [r for r in runs if "pip install" in r]
    # torch before DeepSpeed (its ops compile against it), the project's extra after.
    order = [next(i for i, r in enumerate(installs) if needle in r)
             for needle in ("torch==", "deepspeed==", '".[trainer]"')]
    assert order == sorted(order)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_operator_extra_installs_cleanly_without_torch(tmp_path):
    """What the operator image's pip does, in a fresh venv: `.[operator]` for real."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # A copy of the sources, as the image's build context has them (no egg-info, no .venv).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "api", "cli", "operator"):
        subprocess.run(["cp", "-r", str(REPO / name), str(src / name)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(src) + "[operator]"], check=True, timeout=800)
    finetune = env_dir / "bin" / "finetune"
    help_out = subprocess.run([str(finetune), "--help"], capture_output=True, text=True,
                              check=True)
    assert "validate" in help_out.stdout
    examples = sorted(str(p) for p in (REPO / "examples").glob("*.yaml"))
    assert examples
    subprocess.run([str(finetune), "validate", "--skip-other-kinds", *examples], check=True)
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    installed = {line.split("==")[0] for line in freeze.splitlines()}
    assert not installed & ML_STACK, installed & ML_STACK
    subprocess.run([str(py), "-c", "import finetune_operator.main, sys; "
                    "assert not {'torch', 'ray'} & set(sys.modules)"], check=True)
