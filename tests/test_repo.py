"""Repository contracts: CI runs README's test command verbatim; every shipped profile validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from anyverse.config import load_config, profile_names

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_command.endswith("python -m pytest -q")
    assert ci_command in (ROOT / "README.md").read_text().splitlines()


@pytest.mark.parametrize("name", profile_names())
def test_every_shipped_profile_validates(name: str) -> None:
    assert load_config(name).profile == name


def test_import_is_light_and_exports_resolve() -> None:
    probe = "import sys, anyverse; assert 'torch' not in sys.modules; print(anyverse.Anyverse.__name__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Anyverse"


@pytest.mark.parametrize("command", [["ruff", "check", "."], ["mypy"]], ids=["ruff", "mypy"])
def test_lint_and_type_checks_are_clean(command: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
