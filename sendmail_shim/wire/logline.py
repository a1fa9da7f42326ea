"""Log records as structured events, and the one quoting rule of the text line.

Every log call of the package is ``log.<level>(TEMPLATE, *args)`` with a string
literal template written by a developer: ``"delivered queue_id=%s site=%s
rcpt=<%s> reply=%r"``.  The template is trusted, the args are not (a script
header, an address, a drop file's name, a relay's reply all come from a site).
So the event is built from the two apart, never by reading the rendered text
back:

- the template names the event (its first words: ``delivered``, ``internal
  error`` -> ``internal_error``) and the fields (``key=%s``, ``key=<%s>``,
  ``key='literal'``); each arg is the value of its placeholder, as it is (a
  ``%r`` of a string is the string itself, not its repr);
- an arg that is a :class:`Fields` (an ordered group of ``key=value`` pairs, for
  facts that several lines share) is spliced in as its fields;
- the text line is rendered from that: the template's own words as they are, and
  every value by :func:`quote`.

The quoting rule (docs/observability.md, "Logs"): a value that is a *plain token* (printable
ASCII without space, ``"``, ``'``, ``\\``, ``=``, ``<``, ``>``, not ending in
``:`` or ``;``) is written as it is, so ``grep queue_id=0194...`` and ``grep
site=example.com`` keep working; any other value is written as a JSON string
literal, ASCII only, with ``=`` written ``\\u003d`` too: ``script="x
site\\u003dvictim"``.  So a line never holds a control character, a newline or
a second ``key=`` that its template did not write.  ``key=<...>`` (addresses)
keeps its brackets: ``sender=<>``, ``rcpt=<a@b.test>``, ``rcpt=<"a b@c">``.
:func:`parse` reads such a line back (for tools and tests; the daemon's JSON log
and metrics take the record's fields, never the text).

Trusts: templates (string literals; tests/unit/test_logline.py checks every log
call of the package passes one).  Guarantees: building an event never raises
(a template whose args do not fit is logged as ``unformatted`` with its args
quoted); a rendered line is one line.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

_KEY = re.compile(r"([a-z_][a-z0-9_]*)=")
_WORD = re.compile(r"[a-z][a-z0-9_]*:?$")
_SPEC = re.compile(r"%(?:\(\w+\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")
_PLAIN = re.compile(r"[A-Za-z0-9!#$%&()*+,\-./:;?@\[\]^_`{|}~]+")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ue000-\uf8ff]")
_JSON_UNSAFE = re.compile(r"[\u2028\u2029\x85\ud800-\udfff]")
_MARK = 0xE000  # placeholders in a template are private-use characters while it is parsed
_MARKS = 0x1000
_MARK_RE = re.compile("[\ue000-\uefff]")
_ATTR = "_shim_event"
_DECODER = json.JSONDecoder()


class Angled(str):
    """A value written ``key=<value>`` (an address) when it is a :class:`Fields` value."""

    __slots__ = ()


class Fields:
    """An ordered group of ``key=value`` fields, spliced into a line as a ``%s`` arg."""

    __slots__ = ("pairs",)

    def __init__(self, *pairs: tuple[str, object], **named: object) -> None:
        self.pairs: tuple[tuple[str, object], ...] = tuple(pairs) + tuple(named.items())

    def replaced(self, **changes: object) -> Fields:
        """The same fields, some values changed (their places kept)."""
        return Fields(*((k, changes.get(k, v)) for k, v in self.pairs))

    def __add__(self, other: Fields) -> Fields:
        return Fields(*self.pairs, *other.pairs)

    def __str__(self) -> str:
        return " ".join(f"{k}={quote(_text(v), isinstance(v, Angled))}" for k, v in self.pairs)

    __repr__ = __str__


@dataclass(frozen=True)
class Event:
    """One log record: its event name, its fields (values as strings), the words after them."""

    name: str
    fields: dict[str, str] = field(default_factory=dict)
    text: str = ""  # words after the fields (``nothing was queued``)
    line: str = field(default="", compare=False)  # the rendered text line

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)


# -- the quoting rule ----------------------------------------------------------------

def is_plain(value: str) -> bool:
    """True when ``value`` is written as it is (see the module docstring)."""
    return bool(_PLAIN.fullmatch(value)) and value[-1] not in ":;"


def quote(value: str, angled: bool = False) -> str:
    """``value`` as the text line writes it: as it is when plain, else a JSON string."""
    if angled:
        return f"<{value}>" if not value or is_plain(value) else f"<{quote(value)}>"
    if is_plain(value):
        return value
    return json.dumps(value).replace("=", "\\u003d").replace("\x7f", "\\u007f")


def _escape_free(text: str) -> str:
    """A template's own words: never a control character (defence: they are literals)."""
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(lambda m: json.dumps(m.group())[1:-1].replace("\x7f", "\\u007f")
                       .replace("\x85", "\\u0085"), text)


def json_safe(text: str) -> str:
    """A JSON text (``ensure_ascii=False``) without raw line separators or lone surrogates."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


# -- the template: names and fields of a line, placeholders as private-use marks ------

@dataclass(frozen=True)
class _Span:
    key: str
    start: int  # the value's text in the marked template, quotes or brackets included
    end: int
    value: str  # the value with its marks still in
    angled: bool


@dataclass(frozen=True)
class _Template:
    name: str
    spans: tuple[_Span, ...]
    text_start: int


def _head(rest: str) -> tuple[list[str], int, bool]:
    """The event's words before the first ``key=``: (words, where the fields start, fields?)."""
    words = rest.split(" ", 1)
    first = words[0].rstrip(":")
    name_parts = [first]
    offset = len(words[0]) + 1
    body = words[1] if len(words) > 1 else ""
    pos = 0
    # A phrase of plain words may name the event ("internal error uid=..." -> internal_error).
    while body and not _KEY.match(body, pos):
        space = body.find(" ", pos)
        word = body[pos:] if space < 0 else body[pos:space]
        if not _WORD.match(word) or word.endswith(":") or len(name_parts) >= 3:
            return [first], offset, False
        name_parts.append(word)
        if space < 0:
            return [first], offset, False
        pos = space + 1
    return name_parts, offset + pos, bool(body)


def _compile(marked: str) -> _Template:
    """Read a marked template (trusted) into its name, its fields' spans, its text."""
    parts, pos, has_fields = _head(marked)
    name = "_".join(parts)
    if _MARK_RE.search(name) or not name:
        name = "message"
    spans: list[_Span] = []
    length = len(marked)
    if not has_fields:
        return _Template(name, (), min(pos, length))
    while pos < length:
        match = _KEY.match(marked, pos)
        if match is None:
            break
        key, pos = match.group(1), match.end()
        start = pos
        angled = False
        if pos < length and marked[pos] in "'\"":
            quoted = _literal(marked, pos)
            if quoted is None:
                break
            value, pos = quoted
        elif pos < length and marked[pos] == "<":
            close = marked.find(">", pos)
            if close < 0:
                break
            value, pos, angled = marked[pos + 1:close], close + 1, True
        else:
            space = marked.find(" ", pos)
            end = length if space < 0 else space
            if marked[end - 1:end] in (":", ";") and end > pos + 1:
                spans.append(_Span(key, pos, end - 1, marked[pos:end - 1], False))
                return _Template(name, tuple(spans), end)
            value, pos = marked[pos:end], end
        spans.append(_Span(key, start, pos, value, angled))
        if pos < length and marked[pos] != " ":
            break  # "reply=%r: nothing was queued"
        pos += 1
    return _Template(name, tuple(spans), min(pos, length))


def _literal(text: str, pos: int) -> tuple[str, int] | None:
    """A quoted literal of a template (``action='...'``) and where it ends."""
    quote_char = text[pos]
    end = pos + 1
    while end < len(text):
        ch = text[end]
        if ch == "\\":
            end += 2
            continue
        if ch == quote_char:
            raw = text[pos:end + 1]
            if "\\" not in raw:
                return raw[1:-1], end + 1
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
            return (value if isinstance(value, str) else str(value)), end + 1
        end += 1
    return None


# -- building an event from a record --------------------------------------------------

def _value(spec: str, arg: object) -> str:
    if spec[-1] in "sr" and isinstance(arg, str):
        return arg  # %r of a string: the string itself (quoting is the renderer's)
    if spec[-1] == "s":
        return str(arg)
    if spec[-1] == "r":
        return repr(arg)
    return spec % (arg,)


@lru_cache(maxsize=1024)
def _split(msg: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """A template's literal pieces (``%%`` folded) and its conversion specs between them."""
    literals: list[str] = []
    specs: list[str] = []
    pos = 0
    piece = ""
    for match in _SPEC.finditer(msg):
        piece += _clean(msg[pos:match.start()])
        pos = match.end()
        spec = match.group()
        if spec == "%%":
            piece += "%"
            continue
        if "*" in spec or "(" in spec:
            return None
        literals.append(piece)
        specs.append(spec)
        piece = ""
    literals.append(piece + _clean(msg[pos:]))
    return tuple(literals), tuple(specs)


def _marked(msg: str, args: tuple[object, ...]) -> tuple[str, list[str], list[bool]] | None:
    """The template with a mark per value, the values, and which are angled."""
    split = _split(msg)
    if split is None or len(split[1]) != len(args) or len(args) >= _MARKS // 4:
        return None
    literals, specs = split
    out: list[str] = [literals[0]]
    values: list[str] = []
    angled: list[bool] = []

    def mark(value: str, is_angled: bool = False) -> str:
        values.append(value)
        angled.append(is_angled)
        return chr(_MARK + len(values) - 1)

    for spec, arg, literal in zip(specs, args, literals[1:], strict=True):
        if isinstance(arg, Fields) and spec == "%s":
            pairs = [f"{k}=" + (f"<{mark(_text(v), True)}>" if isinstance(v, Angled)
                                else mark(_text(v)))
                     for k, v in arg.pairs[:_MARKS // 4] if _KEY.fullmatch(k + "=")]
            if pairs:
                out.append(" ".join(pairs))
            elif out[-1].endswith(" "):
                out[-1] = out[-1][:-1]
        else:
            try:
                out.append(mark(_value(spec, arg)))
            except (TypeError, ValueError, OverflowError):
                return None
        out.append(literal)
    if len(values) >= _MARKS:
        return None
    return "".join(out), values, angled


def _clean(literal: str) -> str:
    """A template's literal text never holds a mark."""
    return _MARK_RE.sub("?", literal) if _MARK_RE.search(literal) else literal


def build(msg: object, args: Iterable[object] | None) -> Event:
    """The event of ``log.<level>(msg, *args)`` (see the module docstring)."""
    arg_tuple = tuple(args) if isinstance(args, tuple) else ()
    if not isinstance(msg, str):
        arg_tuple, msg = (msg,), "message %s"  # an object logged as it is: one value
    if not arg_tuple:
        marked: tuple[str, list[str], list[bool]] | None = (_clean(msg), [], [])
    else:
        marked = _marked(msg, arg_tuple)
    if marked is None:  # the args do not fit the template: nothing is read from them
        shown = " ".join(quote(_safe_str(a)) for a in arg_tuple)
        first = msg.split(" ", 1)[0]
        return Event("unformatted", {}, "", _escape_free(f"unformatted {quote(first)} "
                                                         f"args: {shown}"))
    text, values, angled = marked
    name, ops, tail = _program(text)
    fields: dict[str, str] = {}
    line: list[str] = []
    for op in ops:
        if isinstance(op, str):
            line.append(op)
        elif isinstance(op, int):
            line.append(quote(values[op], angled[op]))
        else:
            key, pieces, is_angled = op
            value = "".join(p if isinstance(p, str) else values[p] for p in pieces)
            fields.setdefault(key, value)
            line.append(quote(value, is_angled))
    rest = "".join(p if isinstance(p, str) else quote(values[p], angled[p]) for p in tail)
    return Event(name, fields, rest.lstrip(": ").strip(), "".join(line))


_Piece = str | int  # literal text, or the index of a value
_Op = str | int | tuple[str, tuple[_Piece, ...], bool]


def _pieces(part: str, free: bool) -> list[_Piece]:
    """``part`` of a marked template as literal text (escaped when free) and value indexes."""
    out: list[_Piece] = []
    pos = 0
    for match in _MARK_RE.finditer(part):
        if match.start() > pos:
            out.append(_escape_free(part[pos:match.start()]) if free
                       else part[pos:match.start()])
        out.append(ord(match.group()) - _MARK)
        pos = match.end()
    if pos < len(part):
        out.append(_escape_free(part[pos:]) if free else part[pos:])
    return out


@lru_cache(maxsize=1024)
def _program(marked: str) -> tuple[str, tuple[_Op, ...], tuple[_Piece, ...]]:
    """How to render a marked template: its name, its line's pieces, its text's pieces."""
    template = _compile(marked)
    ops: list[_Op] = []
    pos = 0
    for span in template.spans:
        ops.extend(_pieces(marked[pos:span.start], True))
        ops.append((span.key, tuple(_pieces(span.value, False)), span.angled))
        pos = span.end
    ops.extend(_pieces(marked[pos:], True))
    tail = tuple(_pieces(marked[template.text_start:], True)) if template.spans else ()
    return template.name, tuple(ops), tail


def _safe_str(arg: object) -> str:
    try:
        return arg if isinstance(arg, str) else repr(arg)
    except Exception:
        return "<unprintable>"


def event_of(record: logging.LogRecord) -> Event:
    """The record's event, built on first use from its template and args, cached on it."""
    cached = getattr(record, _ATTR, None)
    if isinstance(cached, Event):
        return cached
    try:
        args = record.args
        if isinstance(args, dict):  # logging's mapping form: not used by the package
            args = (args,)
        event = build(record.msg, args)
    except Exception:
        event = Event("unparsed", {}, "", _escape_free(quote(str(record.msg))))
    setattr(record, _ATTR, event)
    return event


class EventRecord(logging.LogRecord):
    """A record whose message is the event's rendered line (the package's loggers).

    Another library's record (aiosmtpd's ``mail.log``, asyncio) keeps its text, on one
    line: its control characters are escaped.
    """

    def getMessage(self) -> str:
        if self.name == "sendmail_shim" or self.name.startswith("sendmail_shim."):
            return event_of(self).line
        return _escape_free(super().getMessage())


def install() -> None:
    """Make the package's records render by the quoting rule (once per process)."""
    if logging.getLogRecordFactory() is logging.LogRecord:
        logging.setLogRecordFactory(EventRecord)


# -- reading a rendered line back -----------------------------------------------------

def parse(line: str) -> Event:
    """A rendered line back into its event (the inverse of the renderer; never raises)."""
    parts, pos, has_fields = _head(line)
    name = "_".join(parts)
    fields: dict[str, str] = {}
    length = len(line)
    if not has_fields:
        return Event(parts[0], {}, line[min(pos, length):].strip(), line)
    while pos < length:
        match = _KEY.match(line, pos)
        if match is None:
            break
        key, pos = match.group(1), match.end()
        angled = pos < length and line[pos] == "<"
        if angled:
            pos += 1
        if pos < length and line[pos] == '"':
            try:
                value, pos = _DECODER.raw_decode(line, pos)
            except ValueError:
                break
            if not isinstance(value, str):
                break
        elif angled:
            close = line.find(">", pos)
            if close < 0:
                break
            value, pos = line[pos:close], close
        else:
            space = line.find(" ", pos)
            end = length if space < 0 else space
            value, pos = line[pos:end], end
            if value[-1:] in (":", ";") and len(value) > 1:
                fields.setdefault(key, value[:-1])
                return Event(name, fields, line[end:].strip(), line)
        if angled:
            if line[pos:pos + 1] != ">":
                break
            pos += 1
        fields.setdefault(key, value)
        if pos < length and line[pos] != " ":
            break
        pos += 1
    text = line[pos:].lstrip(": ").strip() if pos < length else ""
    return Event(name, fields, text, line)


def render(name: str, fields: dict[str, str], angled: Iterable[str] = ()) -> str:
    """``name key=value ...`` by the quoting rule (tests and tools; the daemon logs templates)."""
    brackets = set(angled)
    return " ".join([name, *(f"{k}={quote(v, k in brackets)}" for k, v in fields.items())])
