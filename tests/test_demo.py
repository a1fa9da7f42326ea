"""The README's first command: the demo runs the whole path in user directories."""

from __future__ import annotations

import os
import subprocess

from conftest import ADMIN


def test_demo_end_to_end(tmp_path: os.PathLike[str]) -> None:
    home = str(tmp_path)
    env = {"HOME": home, "PATH": os.path.dirname(ADMIN) + ":/usr/bin:/bin"}
    for _run in range(2):  # the second run reuses the configuration it wrote
        done = subprocess.run([ADMIN, "demo"], capture_output=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr.decode()
        out = done.stdout.decode()
        assert "AUTH login : demo.example" in out
        assert "MAIL FROM  : <noreply@demo.example>" in out
        assert "RCPT TO    : <someone@example.net>" in out
        assert "\n.\n(the line above is a lone dot" in out
        # The README's first command ends with the lean launcher, not pip's wrapper.
        assert f"lean launcher: wrote {os.path.join(os.path.dirname(ADMIN), 'sendmail-shim')}" \
            in out
    with open(os.path.join(os.path.dirname(ADMIN), "sendmail-shim")) as fh:
        assert fh.readline().rstrip().endswith(" -IS")
    config = os.path.join(home, ".config", "sendmail-shim", "config.yaml")
    assert os.path.exists(config)
    secret = os.path.join(home, ".config", "sendmail-shim", "secrets", "demo.example")
    assert os.stat(secret).st_mode & 0o077 == 0
    maildir = os.path.join(home, ".local", "share", "sendmail-shim", "demo-maildir", "new")
    assert len(os.listdir(maildir)) == 2
