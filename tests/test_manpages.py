"""man/ pages: lint clean, and they name every flag, command, option and key the code has."""

from __future__ import annotations

import os
import shutil
import subprocess

import click
import pytest

from sendmail_shim import config
from sendmail_shim.admin.cli import cli
from sendmail_shim.config import manpage, model
from sendmail_shim.frontend.sendmail import FLAGS, MODES
from sendmail_shim.wire import paths

MAN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "man")
PAGES = ("sendmail-shim.8", "sendmail-shim-admin.8", "sendmail-shim.yaml.5")


def page(name: str) -> str:
    with open(os.path.join(MAN, name)) as fh:
        return fh.read().replace("\\-", "-").replace("\\fI", "").replace("\\fP", "")


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="needs mandoc")
@pytest.mark.parametrize("name", PAGES)
def test_lint_clean(name: str) -> None:
    done = subprocess.run(["mandoc", "-Tlint", os.path.join(MAN, name)], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_sendmail_page_names_every_flag_and_mode() -> None:
    text = page("sendmail-shim.8")
    for flag, (_arg, what) in FLAGS.items():
        assert f"-{flag}" in text, flag
        assert what.split(":")[0] in text, flag  # accepted / ignored, as in the table
    for letter in MODES:
        assert f"-b{letter}" in text, letter
    assert "--site" in text


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    found = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            found += commands(cmd, (*path, name))
        else:
            found.append((" ".join((*path, name)), cmd))
    return found


def test_admin_page_names_every_command_and_option() -> None:
    text = page("sendmail-shim-admin.8")
    for name, cmd in commands(cli):
        assert f'"{name}"' in text, name
        for param in cmd.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    assert opt in text, (name, opt)


def test_yaml_page_key_list_is_generated_from_the_schema() -> None:
    """The key list comes from config.model: regenerate it when the schema changes."""
    with open(os.path.join(MAN, "sendmail-shim.yaml.5"), encoding="utf-8") as fh:
        text = fh.read()
    assert manpage.replaced(text) == text, (
        "man/sendmail-shim.yaml.5 differs from the schema: run "
        "python3 -m sendmail_shim.config.manpage --write man/sendmail-shim.yaml.5")


def test_yaml_page_names_every_key() -> None:
    text = page("sendmail-shim.yaml.5")
    for _, cls in manpage.SECTIONS:  # each key by its path in its section (log.target)
        for _, key in model.keys_of(cls):
            assert f".B {key.name}\n" in text, key.name
    named = {w.strip(".,;:()").split(".")[-1] for w in text.split()}  # and each listed word
    keys = (*config.TOP_KEYS, *config.SITE_KEYS, *config.RELAY_KEYS, *config.QUOTA_KEYS,
            *config.OUTBREAK_KEYS, *config.LOG_KEYS, *config.RETRY_KEYS, *config.ADMIN_KEYS,
            *config.FIREWALL_KEYS, *config.RESOLVER_KEYS, *config.TLS_MODES,
            *config.SENDER_ACTIONS, *config.FROM_ACTIONS)
    for key in keys:
        assert f".B {key}" in text or f" {key} " in text or key in named, key


def test_tmpfiles_match_paths() -> None:
    """packaging/tmpfiles.d is the spool manifest of paths.py, for systemd-tmpfiles."""
    with open(os.path.join(os.path.dirname(MAN), "packaging", "tmpfiles.d",
                           "sendmail-shim.conf")) as fh:
        rules = {line.split()[1]: int(line.split()[2], 8) for line in fh
                 if line.startswith("d ")}
    root = paths.DEFAULT_SPOOL
    want = {root: paths.MODE_SPOOL_ROOT, f"{root}/public": paths.MODE_PUBLIC_DIR,
            f"{root}/maildrop": paths.MODE_MAILDROP_DIR,
            f"{root}/control": paths.MODE_CONTROL_DIR}
    for name in ("tmp", "incoming", "deferred", "hold", "corrupt", "status", "state"):
        want[f"{root}/{name}"] = paths.MODE_PRIVATE_DIR
    assert rules == want
