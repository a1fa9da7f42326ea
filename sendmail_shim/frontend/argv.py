"""The sendmail command line: a flag table, and a parser that follows it.

Trusts: nothing.  argv may carry words appended by PHP's mail() 5th argument
(CVE-2016-10033 used ``-X/path`` to write a log into the web root).
Guarantees: every flag is in :data:`FLAGS` as accepted, ignored or refused; an
ignored flag never opens, reads or writes anything; an unknown flag or a
refused mode is a usage error (EX_USAGE) with a message naming it.

Parsing follows Postfix's sendmail: POSIX getopt without permutation (the
first word that is not an option ends the options, as does ``--``); flags may
be grouped (``-ti``); an argument may be attached or separate (``-fX``,
``-f X``); ``-o`` takes the rest of its word (``-oem``, ``-oi``); repeats are
allowed and the last value wins.

Stdlib-free, no ``__future__`` import either: this runs on every PHP mail() call.
"""

# Flag -> (takes an argument, what we do with it).  "accepted" flags change
# what happens; "ignored" flags are read and dropped without side effects.
FLAGS: dict[str, tuple[bool, str]] = {
    "A": (True, "ignored: Sendmail's -Ac/-Am config choice"),
    "B": (True, "accepted: body type (7BIT, 8BITMIME), recorded"),
    "C": (True, "ignored: alternate configuration file; never opened"),
    "F": (True, "accepted: sender's full name for an added From: header"),
    "G": (False, "ignored: gateway submission"),
    "I": (False, "accepted: same as -bi (newaliases): nothing to do"),
    "L": (True, "ignored: syslog label"),
    "N": (True, "accepted: DSN notify (never, or failure,delay,success); never = no bounce"),
    "O": (True, "ignored: Sendmail option=value (e.g. QueueDirectory); nothing is set"),
    "R": (True, "accepted: DSN return (hdrs, full), recorded"),
    "U": (False, "ignored: initial user submission"),
    "V": (True, "accepted: DSN envelope id, recorded"),
    "X": (True, "ignored: traffic log file; never opened"),
    "b": (True, "accepted: mode, see the modes below"),
    "c": (False, "ignored: hold expensive connections"),
    "d": (True, "ignored: debug"),
    "e": (True, "ignored: error reporting mode"),
    "f": (True, "accepted: envelope sender; <> for the null sender"),
    "h": (True, "ignored: hop count"),
    "i": (False, "accepted: a line with a lone dot does not end the message"),
    "m": (False, "ignored: send to me too"),
    "n": (False, "ignored: no aliasing"),
    "o": (True, "accepted: -oi as -i; every other -o option ignored"),
    "p": (True, "ignored: protocol name"),
    "q": (True, "accepted: run the queue now (-q, -q<interval>, -qR<site>, -qS<site>)"),
    "r": (True, "accepted: same as -f"),
    "t": (False, "accepted: recipients from To/Cc/Bcc (Resent-* when present); Bcc removed"),
    "v": (False, "ignored: verbose"),
    "x": (False, "ignored: trace"),
}
# -q's argument is optional: a bare -q takes none.
OPTIONAL_ARGUMENT = frozenset("q")

MODES: dict[str, str] = {
    "m": "mail",  # the default: read a message from stdin
    "i": "newaliases",  # nothing to do: we keep no alias database
    "p": "mailq",  # list the queue
    "s": "smtp",  # SMTP dialogue on stdin/stdout
}
REFUSED_MODES: dict[str, str] = {
    "d": "-bd (run as a daemon): start the daemon with 'sendmail-shim-admin serve'",
    "D": "-bD (daemon in foreground): start the daemon with 'sendmail-shim-admin serve'",
    "h": "-bh (host status): there is no host status database",
    "H": "-bH (purge host status): there is no host status database",
    "l": "-bl (listen): start the daemon with 'sendmail-shim-admin serve'",
    "v": "-bv (verify addresses) is not supported",
    "a": "-ba (ARPANET mode) is not supported",
    "t": "-bt (address test mode) is not supported",
}


class UsageError(Exception):
    """A command line we do not accept; exit EX_USAGE."""


class Invocation:
    """What the command line asks for."""

    __slots__ = (
        "body_type",
        "envid",
        "extract",
        "fullname",
        "ignore_dots",
        "ignored",
        "mode",
        "notify",
        "recipients",
        "ret",
        "sender",
        "site",
    )

    def __init__(self) -> None:
        self.mode = "mail"
        self.sender: str | None = None
        self.fullname: str | None = None
        self.extract = False
        self.ignore_dots = False
        self.recipients: list[str] = []
        self.notify: str | None = None
        self.ret: str | None = None
        self.envid: str | None = None
        self.body_type: str | None = None
        self.ignored: list[str] = []
        self.site: str | None = None


def usage_text() -> str:
    """``sendmail-shim --help``: generated from the flag table, so it cannot drift."""
    lines = [
        "usage: sendmail-shim [flags] [--] [recipient ...]   (also: mailq, newaliases)",
        "",
        "Reads a message on stdin and queues it for the sendmail-shim daemon, which sends",
        "it through the relay under your site's login.  Exit 0 means durably queued.",
        "",
        "flags (the Postfix/Sendmail command line; '-X arg' takes an argument):",
    ]
    for flag, (takes_arg, what) in FLAGS.items():
        name = f"-{flag} arg" if takes_arg else f"-{flag}"
        lines.append(f"  {name:<8} {what}")
    lines.append("  --site S  accepted: which of your own sites sends (a hint; the uid decides)")
    lines += ["", "modes for -b:"]
    lines += [f"  -b{letter}      {mode}" for letter, mode in MODES.items()]
    lines += [f"  -b{letter}      refused: {why}" for letter, why in REFUSED_MODES.items()]
    lines += ["", "exit status: 0 queued; 64 usage; 65 bad message; 75 try again later;",
              "77 not permitted (site refused); 78 configuration error.",
              "configuration: $SENDMAIL_SHIM_CONFIG, /etc/sendmail-shim/config.yaml, or the",
              "per-user file; see sendmail-shim(8)."]
    return "\n".join(lines) + "\n"


# Flags whose value is kept as given, by the Invocation attribute it sets.
_VALUE_FLAGS = {"f": "sender", "r": "sender", "F": "fullname", "N": "notify", "R": "ret",
                "V": "envid", "B": "body_type"}


def _apply(inv: Invocation, flag: str, value: str | None) -> None:
    if flag in _VALUE_FLAGS:
        setattr(inv, _VALUE_FLAGS[flag], value)
    elif flag == "t":
        inv.extract = True
    elif flag == "i":
        inv.ignore_dots = True
    elif flag == "o":
        if value == "i":
            inv.ignore_dots = True
        else:
            inv.ignored.append("-o" + (value or ""))
    elif flag == "b":
        if not value:
            raise UsageError("-b needs a mode letter (for example -bs or -bp)")
        if value[0] in REFUSED_MODES:
            raise UsageError(REFUSED_MODES[value[0]])
        if value[0] not in MODES:
            raise UsageError(f"-b{value}: unsupported mode")
        inv.mode = MODES[value[0]]
    elif flag == "I":
        inv.mode = "newaliases"
    elif flag == "q":
        inv.mode = "flush"
    else:
        inv.ignored.append("-" + flag + (value or ""))


def parse_argv(argv: list[str]) -> Invocation:
    """Parse ``argv`` (argv[0] included) into an :class:`Invocation`."""
    inv = Invocation()
    prog = argv[0].rsplit("/", 1)[-1] if argv else "sendmail"
    if prog == "mailq":
        inv.mode = "mailq"
    elif prog == "newaliases":
        inv.mode = "newaliases"
    words = argv[1:]
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--":
            index += 1
            break
        if word == "--site" or word.startswith("--site="):
            # Operator's hint (PHP-FPM pool): chooses among the caller's own sites only.
            if word == "--site":
                if index + 1 >= len(words):
                    raise UsageError("option requires an argument -- 'site'")
                index += 1
                inv.site = words[index]
            else:
                inv.site = word.split("=", 1)[1]
            index += 1
            continue
        if len(word) < 2 or word[0] != "-":
            break
        pos = 1
        while pos < len(word):
            flag = word[pos]
            spec = FLAGS.get(flag)
            if spec is None:
                raise UsageError(f"invalid option -- '{flag}'")
            takes_arg, _what = spec
            pos += 1
            if not takes_arg:
                _apply(inv, flag, None)
                continue
            if pos < len(word):
                value: str | None = word[pos:]
            elif flag in OPTIONAL_ARGUMENT:
                value = None
            elif index + 1 < len(words):
                index += 1
                value = words[index]
            else:
                raise UsageError(f"option requires an argument -- '{flag}'")
            _apply(inv, flag, value)
            break
        index += 1
    inv.recipients = words[index:]
    return inv
