"""admin/launcher.py: the python3 -IS launcher a pip or venv install gets."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sendmail_shim import __version__
from sendmail_shim.admin.launcher import (
    LauncherError,
    launcher_text,
    package_dir,
    write_launcher,
)

PACKAGED = Path(__file__).resolve().parents[2] / "packaging" / "bin" / "sendmail-shim"
PIP_WRAPPER = (f"#!{sys.executable}\nimport re\nimport sys\n"
               "from sendmail_shim.frontend.sendmail import main\n"
               "if __name__ == '__main__':\n    sys.exit(main())\n")


def test_the_text_runs_this_interpreter_without_site_and_finds_this_install() -> None:
    text = launcher_text()
    assert text.splitlines()[0] == f"#!{sys.executable} -IS"
    assert f"sys.path.append({package_dir()!r})" in text
    assert os.path.isdir(os.path.join(package_dir(), "sendmail_shim", "frontend"))


def test_the_debian_launcher_is_the_same_program() -> None:
    """packaging/bin/sendmail-shim and the written launcher differ only in their paths."""
    ours = launcher_text("/usr/bin/python3", "/usr/lib/python3/dist-packages")
    theirs = PACKAGED.read_text()
    assert theirs.splitlines()[0] == ours.splitlines()[0]
    assert ast.dump(ast.parse(theirs)) == ast.dump(ast.parse(ours))


@pytest.mark.parametrize("interpreter", ["/opt/my venv/bin/python3", "python3",
                                         "/" + "x" * 130])
def test_an_interpreter_a_shebang_cannot_hold_is_refused(interpreter: str) -> None:
    with pytest.raises(LauncherError, match="keep pip's wrapper"):
        launcher_text(interpreter)


def test_written_launcher_runs_and_ignores_the_callers_python_variables(
        tmp_path: Path) -> None:
    target = tmp_path / "sendmail-shim"
    target.write_text(PIP_WRAPPER)
    assert write_launcher(str(target)) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert target.read_text() == launcher_text()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "nothing"),
           "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run([str(target), "--version"], capture_output=True, env=env,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"sendmail-shim {__version__}\n"
    assert done.stderr == b""  # -I: PYTHONPROFILEIMPORTTIME had no effect
    assert sorted(os.listdir(tmp_path)) == ["sendmail-shim"]  # no temporary file left


def test_a_file_that_is_not_a_launcher_is_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "sendmail-shim"
    target.write_text("#!/bin/sh\necho someone else's\n")
    with pytest.raises(LauncherError, match="not a sendmail-shim launcher"):
        write_launcher(str(target))
    assert target.read_text() == "#!/bin/sh\necho someone else's\n"


def test_a_directory_it_cannot_write_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="cannot write"):
        write_launcher(str(tmp_path / "missing" / "sendmail-shim"))
