"""The house's layers: the contract (finetune_api) imports nothing above it; the operator and
the trainer import the contract and never the command line, which sits on top of them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "finetune_api": ROOT / "api" / "finetune_api",
    "finetune_operator": ROOT / "operator" / "finetune_operator",
    "finetune_trainer": ROOT / "trainer_image" / "finetune_trainer",
    "finetune_cli": ROOT / "cli" / "finetune_cli",
}
# What each package may not import (lazily inside a function included).
FORBIDDEN = {
    "finetune_api": {"finetune_operator", "finetune_trainer", "finetune_cli", "kopf", "torch",
                     "ray", "deepspeed", "transformers"},
    "finetune_operator": {"finetune_trainer", "finetune_cli"},
    "finetune_trainer": {"finetune_operator", "finetune_cli", "kopf"},
    "finetune_cli": set(),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_package_imports_a_layer_above_it(package):
    files = sorted(PACKAGES[package].rglob("*.py"))
    assert files, package
    bad = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & FORBIDDEN[package])
           for f in files}
    assert not {f: names for f, names in bad.items() if names}


def test_the_scan_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from finetune_operator.render import render_job\n"
                      "    import finetune_trainer.tiny\n")
    assert imported_modules(module) == {"finetune_operator", "finetune_trainer"}


def test_the_console_script_is_the_cli_package():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["finetune"].startswith("finetune_cli.")
