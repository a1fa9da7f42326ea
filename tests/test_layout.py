"""The import contract (pyproject.toml, [tool.importlinter]) holds, and fails on a violation.

The checker runs on a copy of the package, so each test can break the copy on purpose:
a front end that imports the configuration, a store that imports the operator's tools,
wire/ importing YAML.  Each must be reported by name; the clean copy must pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([str(LINT), "--no-cache", str(tree / "pyproject.toml")],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "sendmail_shim", tmp_path / "sendmail_shim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_keeps_the_contract(tree: Path) -> None:
    done = lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("frontend/sendmail.py", "from sendmail_shim.config import Config  # noqa", "the front end"),
    ("frontend/sendmail.py", "import yaml  # noqa", "the front end"),
    ("store/spool.py", "from sendmail_shim.admin import cli  # noqa", "layers point down"),
    ("intake/accept.py", "from sendmail_shim.delivery import runner  # noqa",
     "layers point down"),
    ("wire/durable.py", "import click  # noqa", "wire/ is the standard library only"),
], ids=["frontend-config", "frontend-yaml", "store-admin", "intake-delivery", "wire-click"])
def test_a_violation_breaks_the_contract(tree: Path, module: str, line: str,
                                         contract: str) -> None:
    append(tree / "sendmail_shim" / module, line)
    done = lint(tree)
    assert done.returncode != 0
    broken = done.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, done.stdout
