"""Site fragments: one file per site in a directory beside the main configuration.

Trusts: the directory's owner (root or the operator), as the main file.
Guarantees: the same files are read by the daemon (start, reload), by
``config check`` and by the admin command, in the same order; a file that is
not valid YAML, or whose content is not a mapping, is a :class:`ConfigError`
naming the file and the line; a site name that cannot be a file name is an
error naming the file, never silently skipped.  The front end never reads
fragments (it reads two lines of the main file, ``wire/paths.py``).

The rules, like nginx's ``conf.d`` and systemd's drop-ins:

- The directory is ``sites_dir``, by default ``sites.d`` beside the
  configuration file (``/etc/sendmail-shim/sites.d``).  A missing directory
  holds no sites.
- A file ``NAME.yaml`` defines site ``NAME``: the file name IS the site name,
  so the two cannot disagree.  Its content is the site's keys (``uids``,
  ``domains``, ... as under ``sites.NAME`` in the main file).
- Read: names ending in ``.yaml`` that do not start with ``.``.  Ignored:
  everything else, so editor and package leftovers (``.NAME.yaml.swp``,
  ``NAME.yaml~``, ``NAME.yaml.bak``, ``NAME.yaml.dpkg-old``) and the admin
  command's own temporary files (``.NAME.yaml.tmp-*``) are never read.  A
  ``NAME.yml`` is ignored too; ``config check`` warns about it.
- Files are read in the order of their names (bytes), after ``sites:`` of
  the main file: that order decides "first listed" when a uid owns several
  sites and no docroot matches (``policy/identity.py``).
- A site named both in ``sites:`` and by a fragment, a domain claimed by two
  sites, or one docroot claimed by two sites of one uid: errors naming both
  files (``loader.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from sendmail_shim.config import plainyaml
from sendmail_shim.config.errors import ConfigError
from sendmail_shim.config.schema import Problem

SUFFIX = ".yaml"
DEFAULT_DIR = "sites.d"
# A site name a fragment may carry: it is also a file name and a relay login's default.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Fragment:
    """One site's file: its name, path, and the YAML tree it holds."""

    name: str
    path: str
    raw: Any
    source: str = ""  # the file read, when not ``path`` (the admin command's candidate)

    def where(self, problem: Problem) -> str:
        """``problem`` of this fragment, with the line of its key (``located``)."""
        return located(self.source or self.path, problem)


def directory_of(config_path: str | None, sites_dir: str | None) -> str | None:
    """The fragments' directory: ``sites_dir``, else ``sites.d`` beside the file (None: none)."""
    if sites_dir:
        return sites_dir
    if config_path is None:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), DEFAULT_DIR)


def is_fragment_name(filename: str) -> bool:
    """Whether the loader reads a file of this name (``NAME.yaml``, not hidden)."""
    return filename.endswith(SUFFIX) and not filename.startswith(".") and filename != SUFFIX


def path_of(directory: str, name: str) -> str:
    return os.path.join(directory, name + SUFFIX)


def listing(directory: str) -> list[str]:
    """The file names the loader reads, in order; [] when the directory does not exist."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read the site directory {directory}: {exc.strerror}") from exc
    return sorted((n for n in names if is_fragment_name(n)), key=os.fsencode)


def ignored(directory: str) -> list[str]:
    """Files that look meant but are not read (``*.yml``): config check warns."""
    try:
        return sorted(n for n in os.listdir(directory)
                      if n.endswith(".yml") and not n.startswith("."))
    except OSError:
        return []


def read_yaml(path: str) -> Any:
    """The YAML tree of one file; a ConfigError naming the file and the line."""
    try:
        with open(path, encoding="utf-8") as fh:
            return plainyaml.load(fh)  # the main file's loader: plain YAML built fast
    except OSError as exc:
        raise ConfigError(f"cannot read site file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}not valid YAML: {problem}") from exc


def read_fragment(path: str, name: str | None = None) -> Fragment:
    """One fragment file, checked as far as a file can be alone (name, YAML, a mapping).

    ``name``: the site's name when ``path`` is not ``NAME.yaml`` (a temporary file).
    """
    if name is None:
        name = os.path.basename(path)[:-len(SUFFIX)]
    if not SITE_NAME.match(name):
        raise ConfigError(f"{path}: {name!r} cannot be a site name (letters, digits, '.', '-' "
                          "and '_', starting with a letter or digit); rename the file")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: line 1: expected the site's keys (uids: [...], domains: "
                          f"[...]), got {'an empty file' if raw is None else type(raw).__name__}")
    return Fragment(name, path, raw)


def read_all(directory: str | None, swap: dict[str, str | None] | None = None
             ) -> list[Fragment]:
    """Every fragment of ``directory`` in order.

    ``swap`` (the admin command's check before it writes) maps a site name to
    the file to read instead of ``NAME.yaml`` (a temporary file), or to None to
    leave the site out.
    """
    if directory is None:
        return []
    swap = swap or {}
    names = {n[:-len(SUFFIX)] for n in listing(directory)} | set(swap)
    found = []
    for name in sorted(names, key=os.fsencode):
        if name in swap:
            instead = swap[name]
            if instead is None:
                continue
            fragment = read_fragment(instead, name)
            found.append(Fragment(name, path_of(directory, name), fragment.raw, instead))
        else:
            found.append(read_fragment(path_of(directory, name)))
    return found


_UNKNOWN_KEY = re.compile(r"^unknown key '([^']*)'")


def located(path: str, problem: Problem) -> str:
    """A site key's problem in a fragment, with the line of its top-level key when known."""
    if problem.where == "top level":
        where, what = "", problem.what
        unknown = _UNKNOWN_KEY.match(what)
        key = unknown.group(1) if unknown else ""
    else:
        where, what = f"{problem.where}: ", problem.what
        key = problem.where.split(".")[0].split("[")[0]
    line = line_of(path, key) if key else None
    return (f"line {line}: " if line is not None else "") + where + what


def line_of(path: str, key: str) -> int | None:
    """The line (from 1) of top-level ``key`` in a fragment, for an error; None if unknown."""
    try:
        with open(path, encoding="utf-8") as fh:
            node = yaml.compose(fh, Loader=_Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if getattr(key_node, "value", None) == key:
                return int(key_node.start_mark.line) + 1
    return None
