"""The vocabulary of the configuration schema: a :class:`Key` per field, and the kinds.

Trusts: nothing it checks; every value comes from the operator's YAML file.
Guarantees: a kind either returns a value of its field's type or raises
:class:`Problem` naming the key path and what is wrong, in the words the
operator sees (``loader`` adds the file name).  The model (``model.py``)
declares each field with :func:`key`; the loader walks those declarations and
the man page's key list (``manpage.py``) is printed from them, so schema,
checks, error paths and documentation cannot drift apart.

A key's ``name`` is its YAML path relative to its section; a dotted name
(``log.target``) is a key of a small inline mapping (``log``) whose own
documentation is in ``model.GROUP_DOCS``.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_RATE = re.compile(r"^\d+/(second|minute|hour|day)$")


class Problem(Exception):
    """A value that does not fit its key; ``where`` is the key path."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what


class Kind:
    """How one key's YAML value is checked and converted; ``what`` documents it."""

    what = ""

    def read(self, value: Any, where: str, owner: str) -> Any:
        """The checked value; ``owner`` names the site being read ('' elsewhere)."""
        raise NotImplementedError

    def missing(self, where: str, name: str) -> Problem:
        """The error for a required key that is absent from its mapping at ``where``."""
        return Problem(where, f"missing key {name!r}")

    def show(self, value: Any) -> str:
        """A default value as the operator would write it."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)


def mapping(value: Any, where: str, known: tuple[str, ...]) -> dict[str, Any]:
    """``value`` as a mapping whose keys are all in ``known`` (None is empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Problem(where, f"expected a mapping, got {type(value).__name__}")
    for name in value:
        if not isinstance(name, str) or name not in known:
            raise Problem(where, f"unknown key {name!r} (known keys: {', '.join(known)})")
    return value


class Text(Kind):
    what = "text"

    def read(self, value: Any, where: str, owner: str) -> str:
        if not isinstance(value, str) or not value:
            raise Problem(where, f"expected a non-empty string, got {value!r}")
        return value


@dataclass(frozen=True)
class Checked(Text):
    """Text that passes ``test``; ``complaint`` is formatted with ``text`` and ``owner``."""

    test: Callable[[str], bool]
    complaint: str
    what: str = "text"

    def read(self, value: Any, where: str, owner: str) -> str:
        text = super().read(value, where, owner)
        if not self.test(text):
            raise Problem(where, self.complaint.format(text=text, owner=owner))
        return text


def absolute_path() -> Checked:
    return Checked(os.path.isabs, "expected an absolute path, got {text!r}", "an absolute path")


def address() -> Checked:
    return Checked(lambda text: "@" in text,
                   "expected an address like noreply@{owner}, got {text!r}", "a mail address")


class UserName(Text):
    what = "a user name of this system"

    def read(self, value: Any, where: str, owner: str) -> str:
        uid(value, where)  # a uid number passes here, then fails as text
        return super().read(value, where, owner)


class GroupName(Text):
    what = "a group name of this system"

    def read(self, value: Any, where: str, owner: str) -> str:
        text = super().read(value, where, owner)
        try:
            grp.getgrnam(text)
        except KeyError:
            raise Problem(where, f"no such group {text!r} on this system") from None
        return text


class Rate(Kind):
    what = "a rate like 10/minute (second, minute, hour or day)"

    def read(self, value: Any, where: str, owner: str) -> str:
        text = str(value)
        if not _RATE.match(text):
            raise Problem(where, f"expected like 10/minute, got {text!r}")
        return text


@dataclass(frozen=True)
class Whole(Kind):
    minimum: int = 0
    maximum: int | None = None  # above it: "expected a port 1-65535"

    @property
    def what(self) -> str:  # type: ignore[override]
        if self.maximum is not None:
            return f"a port {self.minimum}-{self.maximum}"
        return f"a whole number >= {self.minimum}"

    def read(self, value: Any, where: str, owner: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise Problem(where, f"expected a whole number >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise Problem(where, f"expected a port {self.minimum}-{self.maximum}, got {value}")
        return value


@dataclass(frozen=True)
class Fraction(Kind):
    """A number in an interval; ``text`` is the error's expectation, ``what`` its doc."""

    test: Callable[[float], bool]
    text: str
    what: str = "a number"

    def read(self, value: Any, where: str, owner: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.test(value):
            raise Problem(where, f"expected {self.text}, got {value!r}")
        return float(value)


class Flag(Kind):
    what = "true or false"

    def read(self, value: Any, where: str, owner: str) -> bool:
        if not isinstance(value, bool):
            raise Problem(where, f"expected true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class Duration(Kind):
    floor: float = 0.0  # shorter values are raised to this
    what = "a duration: seconds, or like 30s, 5m, 2h, 5d, 1w"

    def read(self, value: Any, where: str, owner: str) -> float:
        return max(self.floor, duration(value, where))

    def show(self, value: Any) -> str:
        seconds = float(value)
        for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
            if seconds >= size and seconds % size == 0:
                return f"{int(seconds // size)}{unit}"
        return f"{super().show(seconds)}s"


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...]

    @property
    def what(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.choices)

    def read(self, value: Any, where: str, owner: str) -> str:
        if value not in self.choices:
            raise Problem(where, f"expected one of {', '.join(self.choices)}, got {value!r}")
        return str(value)


@dataclass(frozen=True)
class Optional(Kind):
    """``inner``, or None when the value is null (or any false value, with ``falsy``)."""

    inner: Kind
    falsy: bool = False

    @property
    def what(self) -> str:  # type: ignore[override]
        return self.inner.what

    def read(self, value: Any, where: str, owner: str) -> Any:
        if value is None or (self.falsy and not value):
            return None
        return self.inner.read(value, where, owner)

    def missing(self, where: str, name: str) -> Problem:
        return self.inner.missing(where, name)

    def show(self, value: Any) -> str:
        return self.inner.show(value)


class Plain(Kind):
    """Any value, as it is (a list's items once they are checked as text)."""

    what = "text"

    def read(self, value: Any, where: str, owner: str) -> Any:
        return value


@dataclass(frozen=True)
class Strings(Kind):
    """A list (null is empty) of non-empty strings, each normalised, then checked by ``item``.

    The path of an item is ``where[i]``.  ``text=False``: items need not be strings (uids).
    ``required``: the list must have items, else this error (also when it is absent).
    """

    item: Kind = field(default_factory=Plain)
    normalise: Callable[[str], str] | None = None
    required: str = ""
    text: bool = True

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"a list, each {self.item.what}"

    def read(self, value: Any, where: str, owner: str) -> tuple[Any, ...]:
        if self.required and (not isinstance(value, list) or not value):
            raise Problem(where, self.required)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise Problem(where, f"expected a list, got {value!r}")
        items = []
        for i, item in enumerate(value):
            at = f"{where}[{i}]"
            if self.text:
                item = Text().read(item, at, owner)
            if self.normalise is not None:
                item = self.normalise(item)
            items.append(self.item.read(item, at, owner))
        return tuple(items)

    def missing(self, where: str, name: str) -> Problem:
        return Problem(f"{where}.{name}", self.required)

    def show(self, value: Any) -> str:
        return ", ".join(self.item.show(v) for v in value) if value else "none"


class Uid(Kind):
    what = "a uid number or a user name"

    def read(self, value: Any, where: str, owner: str) -> int:
        return uid(value, where)


class Domain(Kind):
    """A domain name (a list item already checked as text and normalised)."""

    what = "a domain name"

    def read(self, value: Any, where: str, owner: str) -> str:
        domain = str(value)
        try:
            ascii_form = domain.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_form = ""
        if not _DOMAIN.match(ascii_form):
            raise Problem(where, f"not a domain name: {domain!r}")
        return domain


class IPAddress(Kind):
    """An IP address (a list item already checked as text)."""

    what = "an IP address"

    def read(self, value: Any, where: str, owner: str) -> str:
        text = str(value)
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise Problem(where, f"not an IP address: {text!r}") from None
        return text


class IPNetwork(Kind):
    """An IP address or network, such as 192.0.2.25 or 192.0.2.0/24."""

    what = "an IP address or network"

    def read(self, value: Any, where: str, owner: str) -> str:
        text = str(value)
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise Problem(where, f"not an IP address or network: {text!r}") from None
        return text


class ListenAddress(Kind):
    """``HOST:PORT`` with an IP address as host (``[::1]:9465`` for IPv6)."""

    what = "an IP address and port, like 127.0.0.1:9465 or [::1]:9465"

    def read(self, value: Any, where: str, owner: str) -> str:
        text = str(value)
        host, colon, port = text.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            ipaddress.ip_address(host[1:-1] if bracketed else host)
            number = int(port)
        except ValueError:
            number = 0
        if not colon or not 0 < number < 65536 or (":" in host and not bracketed):
            raise Problem(where, f"expected {self.what}, got {text!r}")
        return text


@dataclass(frozen=True)
class Section(Kind):
    """A nested mapping read by the loader with ``cls``'s own keys.

    ``disable``: the value false means None (no rules at all).  ``many``: a list
    of such mappings (``error`` when it is not a list; null or empty is none).
    """

    cls: type
    title: str
    disable: bool = False
    many: bool = False
    error: str = ""

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"a list of mappings, see {self.title}" if self.many else f"see {self.title}"

    def read(self, value: Any, where: str, owner: str) -> Any:
        raise NotImplementedError("the loader reads sections")


@dataclass(frozen=True)
class Deferred(Kind):
    """Read by the loader's explicit cross-field code (sites inherit defaults...)."""

    what: str = ""

    def read(self, value: Any, where: str, owner: str) -> Any:
        raise NotImplementedError("the loader reads this key with explicit code")


@dataclass(frozen=True)
class Key:
    """One YAML key: where it is, what it accepts, what it is for."""

    name: str  # YAML path within the section, dotted for a small inline mapping
    kind: Kind
    doc: str  # one line for the man page
    required: bool = False
    default_text: str = ""  # the default as the man page says it, when not the field's own


def key(default: Any = MISSING, *, kind: Kind, doc: str, name: str = "",
        factory: Callable[[], Any] | None = None, required: bool = False,
        default_text: str = "") -> Any:
    """A dataclass field declaring its YAML key (``name``: the field's name unless given)."""
    meta = {"key": Key(name, kind, doc, required, default_text)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def duration(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise Problem(where, f"expected a duration like 30s, 5m, 2h or 5d, got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def uid(value: Any, where: str) -> int:
    """A uid number, or the uid of an existing user name."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise Problem(where, f"no such user {value!r} on this system") from None
    raise Problem(where, f"expected a uid number or a user name, got {value!r}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
