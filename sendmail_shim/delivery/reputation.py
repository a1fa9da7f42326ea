"""The reputation watch: each relay's ``public_ip`` looked up in DNS blocklists (DNSBLs).

How one (relay, zone) is asked (dnspython, async, the resolver of ``resolver.*``): the
address reversed (IPv4 octets, IPv6 nibbles) under the zone, or under ``<key>.<zone>``
when the zone has an access key (Spamhaus DQS); an A query, and a TXT query for the
reason when it is listed.  What the answer means:

* NXDOMAIN, or no A record: **clean** (not listed);
* addresses in 127.0.0.0/8: **listed**, with the return codes and the TXT text;
* an address in 127.255.255.0/24 (Spamhaus: .254 query through a public or open
  resolver, .255 too many queries), or 127.0.0.1 (the "query refused" / "list the
  world" answer of URIBL and others): **unknown**, never a listing: a warning naming the
  zone and what to do;
* an address outside 127.0.0.0/8: **unknown**, never a listing: a resolver that
  rewrites NXDOMAIN, or a zone whose domain expired and now answers every name;
* a timeout, SERVFAIL or any other resolver trouble: **unknown**, never a listing.

So only a clean 127/8 code is a listing, and only a listing can burn a relay.

Microsoft SNDS (optional, ``reputation.snds_url_file`` or ``snds_url``: the ipStatus URL
with the operator's key) is a second signal under the zone name ``snds``.  The file
is CSV, one blocked range a line, ``first ip,last ip,blocked,details`` (as the SNDS
automated-access tools that read it parse it; IPv4 only): an IPv4 relay inside a range
whose third column is not ``No`` is listed (code: that column, reason: the details),
else clean; a fetch that fails is unknown for every relay.  Clean only means "not
blocked among the ranges this SNDS account covers": register the relays there.

The watch (:class:`Watch`, a background task of the daemon) asks every relay with a
``public_ip`` in every zone at start and then every ``reputation.interval``, without
blocking the loop (async DNS; notices and the State in a worker thread).  A listing not
already reported since the daemon started is a ``reputation_listed`` warning (relay,
ip, zone, code, reason) and a notice to ``admin.notify``; with ``auto_burn: true`` the
relay is burned (``policy.relays.burn``, reason naming the zone and code) unless it is
burned already.  A listing that goes away is logged (``reputation_delisted``) and
nothing else: a burned relay is never restored by the watch (a delisted IP may be
listed again within hours); the operator runs ``relay restore``.  Every result is a
``reputation_checked`` debug line, which the metrics turn into per relay and zone
gauges.  Decisions: what was reported lives in memory, so after a restart a relay still
listed is reported once more; ``relay check`` (:func:`check_text`) only reports: it
sends no notice and burns nothing.

A relay is named by :attr:`Relay.ident` (its ``name``, else ``host:port``): the name
``relay burn`` and ``relay restore`` take.

Trusts: the configuration, and DNS answers and the SNDS file only as far as the rules
above (an answer can make a relay unknown or listed, never crash the daemon or burn on
a refusal; their text is cut and made printable before it is logged or mailed).
Guarantees: a check never raises for DNS or HTTP trouble; the watch survives any
failure of one round (logged, tried again next interval) and stops when asked, after
its lookups in flight (an SNDS fetch: at most SNDS_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import logging
import sqlite3
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from sendmail_shim.config import Config
from sendmail_shim.config.model import Zone
from sendmail_shim.delivery.route import resolver_of
from sendmail_shim.policy import relays as relay_marks
from sendmail_shim.policy.periodic import Periodic
from sendmail_shim.policy.sanctions import OperationError, notify_admin
from sendmail_shim.store.state import State

log = logging.getLogger(__name__)

LISTED, CLEAN, UNKNOWN = "listed", "clean", "unknown"
ACTOR = "reputation watch"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
REFUSED_ANSWER = ipaddress.ip_address("127.0.0.1")
PARALLEL = 8  # queries in flight at once
SNDS = "snds"  # the zone name of Microsoft SNDS's results
SNDS_TIMEOUT = 10.0  # the fetch runs in a thread: a stop waits for it at most this long
SNDS_MAX_BYTES = 4 << 20  # an ipStatus file larger than this is cut
ERROR_MEANINGS = {
    "127.255.255.252": "the zone name is mistyped",
    "127.255.255.254": "the query came through a public or open resolver",
    "127.255.255.255": "too many queries from this resolver",
}
RESOLVER_ADVICE = ("ask through a resolver of your own (resolver.nameservers) that is not a "
                   "public one, or use the zone's registered or paid access (for Spamhaus: a "
                   "DQS key, reputation.zones[].key)")


@dataclass(frozen=True)
class Result:
    """What one zone said of one relay's public_ip."""

    relay: str
    ip: str
    zone: str  # the zone's label (never its access key)
    status: str  # LISTED, CLEAN or UNKNOWN
    codes: tuple[str, ...] = ()  # the A answers
    text: str = ""  # LISTED: the TXT reason; UNKNOWN: why, and what to do

    @property
    def code(self) -> str:
        return ",".join(self.codes) or "-"


def reverse_name(ip: str) -> str:
    """The query label of ``ip``: IPv4 octets or IPv6 nibbles reversed, dot-separated."""
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


def query_name(ip: str, zone: Zone) -> str:
    """The absolute name asked for ``ip`` in ``zone`` (with its access key, if any)."""
    return f"{reverse_name(ip)}.{zone.query_suffix}."


def classify(answers: list[str]) -> tuple[str, str]:
    """(LISTED, "") or (UNKNOWN, why and what to do) for the A answers of a listed name."""
    addresses = []
    for text in answers:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            return UNKNOWN, f"the answer {text!r} is not an address; never a listing"
    outside = [str(a) for a in addresses if a not in LOOPBACK]
    if outside:
        return UNKNOWN, (f"the resolver answered {', '.join(outside)}, outside 127.0.0.0/8: a "
                         "resolver that rewrites unknown names, or a zone that no longer "
                         "exists; never a listing; use a resolver that does not rewrite "
                         "answers, and check that the zone is still served")
    errors = [str(a) for a in addresses if a in ERROR_CODES]
    if errors:
        meaning = "; ".join(f"{code}: {ERROR_MEANINGS.get(code, 'an error code')}"
                            for code in errors)
        return UNKNOWN, (f"the zone refused the query ({meaning}); never a listing; "
                         f"{RESOLVER_ADVICE}")
    if REFUSED_ANSWER in addresses:
        return UNKNOWN, ("the zone answered 127.0.0.1, which lists refuse queries with (or "
                         f"use when they list the world); never a listing; {RESOLVER_ADVICE}")
    return LISTED, ""


async def _lookup(resolver: dns.asyncresolver.Resolver, name: str,
                  rdtype: str) -> list[str] | None:
    """The answers as text (TXT: its strings joined); None for NXDOMAIN or no records.

    Raises DNSException for any other trouble.
    """
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    if answer.rrset is None:
        return None
    if rdtype == "TXT":
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]
    return [r.to_text() for r in answer.rrset]


def _printable(text: str, limit: int = 300) -> str:
    """A zone's TXT text as one printable line (it goes into logs and notices)."""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


async def check_one(resolver: dns.asyncresolver.Resolver, relay: str, ip: str,
                    zone: Zone) -> Result:
    """Ask ``zone`` about ``ip`` (see the module docstring); never raises for DNS trouble."""
    try:
        name = query_name(ip, zone)
    except (OSError, ValueError) as exc:  # key_file
        return Result(relay, ip, zone.name, UNKNOWN,
                      text=f"reputation.zones[].key_file cannot be used "
                           f"({_secret_problem(exc)}); never a listing; make it readable by "
                           "the daemon's user, the key on its first line")
    try:
        answers = await _lookup(resolver, name, "A")
    except dns.exception.Timeout:
        return Result(relay, ip, zone.name, UNKNOWN,
                      text="no answer within resolver.timeout; never a listing; check that "
                           "the resolver can reach the zone")
    except dns.exception.DNSException as exc:
        # The error names the query, whose access key must stay out of logs and notices.
        shown = f"{reverse_name(ip)}.{zone.zone.lower().rstrip('.')}"
        if name.rstrip(".") != shown:
            shown = f"{reverse_name(ip)}.<key>.{zone.zone.lower().rstrip('.')}"
        why = str(exc).replace(name.rstrip("."), shown)
        return Result(relay, ip, zone.name, UNKNOWN,
                      text=f"the lookup failed ({exc.__class__.__name__}: {why}); never a "
                           "listing; it is asked again next interval")
    if not answers:
        return Result(relay, ip, zone.name, CLEAN)
    codes = tuple(sorted(answers, key=lambda a: (len(a), a)))
    status, why = classify(answers)
    if status != LISTED:
        return Result(relay, ip, zone.name, status, codes, why)
    try:
        texts = await _lookup(resolver, name, "TXT") or []
    except dns.exception.DNSException:
        texts = []
    return Result(relay, ip, zone.name, LISTED, codes, _printable(" ".join(texts)))


def watched(config: Config, name: str | None = None) -> list[tuple[str, str]]:
    """(relay name, public_ip) of the relays with a public_ip (only ``name`` if given)."""
    relays = [(r.ident, str(ipaddress.ip_address(r.public_ip)))
              for r in config.relays if r.public_ip]
    if name is None:
        return relays
    names = [r.ident for r in config.relays]
    if name not in names:
        raise OperationError(f"no relay {name!r} in {config.path} (relays: "
                             f"{', '.join(names) or 'none'})")
    chosen = [pair for pair in relays if pair[0] == name]
    if not chosen:
        raise OperationError(f"relay {name} has no public_ip in {config.path}: set "
                             "relays[].public_ip to the address receivers see")
    return chosen


async def check(config: Config, name: str | None = None) -> list[Result]:
    """Every watched relay (or ``name``) in every zone, a few queries at a time."""
    resolver = resolver_of(config)
    gate = asyncio.Semaphore(PARALLEL)

    async def one(relay: str, ip: str, zone: Zone) -> Result:
        async with gate:
            return await check_one(resolver, relay, ip, zone)

    pairs = watched(config, name)
    results = list(await asyncio.gather(*(one(relay, ip, zone) for relay, ip in pairs
                                          for zone in config.reputation.zones)))
    if config.reputation.snds:
        try:
            url = config.reputation.read_snds_url()
        except (OSError, ValueError) as exc:
            why = (f"reputation.snds_url_file cannot be used ({_secret_problem(exc)}); never a "
                   "listing; make it readable by the daemon's user, the URL on its first line")
            return results + [Result(relay, ip, SNDS, UNKNOWN, text=why) for relay, ip in pairs
                              if ipaddress.ip_address(ip).version == 4]
        results += await asyncio.to_thread(snds_results, url, pairs)
    return results


def _secret_problem(exc: BaseException) -> str:
    """What is wrong with a secret file, without its content."""
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def watching(config: Config) -> bool:
    """Whether there is anything to watch: a zone or SNDS, and a relay with a public_ip."""
    return bool(config.reputation.zones or config.reputation.snds) and bool(
        watched(config))


def snds_ranges(text: str) -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, str,
                                         str]]:
    """The rows of SNDS's ipStatus file: (first ip, last ip, blocked, details).

    One range a line, ``first,last,blocked,details`` (no header); lines that do not
    start with two IPv4 addresses are skipped.
    """
    rows = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2:
            continue
        try:
            first, last = ipaddress.IPv4Address(row[0].strip()), ipaddress.IPv4Address(
                row[1].strip())
        except ValueError:
            continue
        rows.append((first, last, row[2].strip() if len(row) > 2 else "",
                     row[3].strip() if len(row) > 3 else ""))
    return rows


def snds_results(url: str, pairs: list[tuple[str, str]]) -> list[Result]:
    """Each IPv4 relay against SNDS's blocked ranges (blocking I/O: run it in a thread).

    A relay inside a range whose blocked column is not "No" is listed (code: that
    column, reason: the details); outside every range it is clean; a fetch that fails
    makes every relay unknown.  SNDS has no IPv6 data: IPv6 relays get no result.
    """
    pairs = [(relay, ip) for relay, ip in pairs if ipaddress.ip_address(ip).version == 4]
    if not pairs:
        return []
    try:
        with urllib.request.urlopen(url, timeout=SNDS_TIMEOUT) as response:  # noqa: S310
            rows = snds_ranges(response.read(SNDS_MAX_BYTES).decode("utf-8", "replace"))
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        why = (f"the SNDS ipStatus file could not be fetched ({exc}); never a listing; "
               "check reputation.snds_url and that automated access is enabled")
        return [Result(relay, ip, SNDS, UNKNOWN, text=why) for relay, ip in pairs]
    results = []
    for relay, ip in pairs:
        address = ipaddress.IPv4Address(ip)
        hits = [r for r in rows if r[0] <= address <= r[1] and r[2].lower() != "no"]
        if hits:
            results.append(Result(relay, ip, SNDS, LISTED, (hits[0][2] or "blocked",),
                                  _printable(hits[0][3])))
        else:
            results.append(Result(relay, ip, SNDS, CLEAN))
    return results


def check_text(config: Config, state: State, name: str | None = None) -> str:
    """``relay check [NAME]``: ask now and say what each zone answered (reports only)."""
    if not (config.reputation.zones or config.reputation.snds):
        return ("no reputation.zones (nor reputation.snds_url) configured: nothing to check "
                "(see REPUTATION WATCH in sendmail-shim.yaml(5) for zones and their usage "
                "terms)\n")
    pairs = watched(config, name)
    if not pairs:
        return "no relay has a public_ip: set relays[].public_ip to watch it\n"
    results = asyncio.run(check(config, name))
    marks = state.relay_marks()
    out = []
    for relay, ip in pairs:
        mark = marks.get(relay)
        burned = f", burned by {mark[2]}: {mark[1]}" if mark else ""
        out.append(f"relay {relay} (public_ip {ip}{burned}):")
        for r in (r for r in results if r.relay == relay):
            detail = {LISTED: f"{r.code}  {r.text or '(no TXT reason)'}", CLEAN: "",
                      UNKNOWN: (f"{r.code}  " if r.codes else "") + r.text}[r.status]
            out.append(f"  {r.zone:<24} {r.status:<8} {detail}".rstrip())
    return "\n".join(out) + "\n"


class Watch(Periodic):
    """The daemon's background watch (see the module docstring)."""

    def __init__(self, config: Callable[[], Config], state: State,
                 burned: Callable[[str], None] | None = None) -> None:
        """``burned(pool)`` is called (from a worker thread) after an auto-burn, so the
        daemon retries that pool's deferred mail on its new relays at once."""
        super().__init__()
        self._config = config
        self.state = state
        self._burned = burned
        self.reported: dict[tuple[str, str], tuple[str, ...]] = {}  # (relay, zone) -> codes

    async def round(self) -> float:
        config = self._config()
        if watching(config):
            try:
                results = await check(config)
                if not self._stopping:
                    await asyncio.to_thread(self.observe, config, results)
            except Exception:
                log.exception("reputation_watch_failed: the round is skipped and tried "
                              "again after reputation.interval")
        return config.reputation.interval

    def observe(self, config: Config, results: list[Result]) -> None:
        """Log each result; a new listing notifies (and burns); a delisting is logged."""
        for r in results:
            log.debug("reputation_checked relay=%s ip=%s zone=%s result=%s code=%s",
                      r.relay, r.ip, r.zone, r.status, r.code)
            key = (r.relay, r.zone)
            if r.status == UNKNOWN:
                log.warning("reputation_unknown relay=%s ip=%s zone=%s code=%s why=%r",
                            r.relay, r.ip, r.zone, r.code, r.text)
            elif r.status == CLEAN and key in self.reported:
                del self.reported[key]
                log.info("reputation_delisted relay=%s ip=%s zone=%s action=%r", r.relay,
                         r.ip, r.zone, "nothing is restored by itself: 'sendmail-shim-admin "
                         f"relay restore {r.relay}' if it was burned")
            elif r.status == LISTED and key not in self.reported:
                self._listed(config, r)

    def _listed(self, config: Config, r: Result) -> None:
        log.warning("reputation_listed relay=%s ip=%s zone=%s code=%s reason=%r auto_burn=%s",
                    r.relay, r.ip, r.zone, r.code, r.text, config.reputation.auto_burn)
        if config.reputation.auto_burn:
            what = f"auto_burn: {self._burn(config, r)}\n\nWhat to do next:"
        else:
            what = ("auto_burn is off: the relay stays in service.\n\nWhat to do next:\n"
                    f"  sendmail-shim-admin relay burn {r.relay} --reason 'listed in "
                    f"{r.zone}'   take it out now")
        try:
            notify_admin(config, f"relay {r.relay} ({r.ip}) is listed in {r.zone}", (
                f"The reputation watch found relay {r.relay}'s public address {r.ip} listed "
                f"in {r.zone}.\n\nReturn code: {r.code}\nReason given: "
                f"{r.text or '(none)'}\n\n{what}\n"
                f"  sendmail-shim-admin relay check {r.relay}   look again now\n"
                "Ask the list for delisting once the cause is fixed; the watch logs the "
                "delisting but restores nothing by itself:\n"
                f"  sendmail-shim-admin relay restore {r.relay}\n"))
        except OSError as exc:
            log.error("reputation_notice_failed relay=%s zone=%s reason=%r action=%r",
                      r.relay, r.zone, str(exc), "free the spool's disk; it is tried again "
                                                 "next interval")
            return
        self.reported[(r.relay, r.zone)] = r.codes

    def _burn(self, config: Config, r: Result) -> str:
        """Burn the relay unless it is burned already; what happened, for the notice."""
        mark = self.state.relay_marks().get(r.relay)
        if mark is not None:
            return f"relay {r.relay} was already burned by {mark[2]} ({mark[1]})"
        try:
            text = relay_marks.burn(config, self.state, r.relay,
                                    f"listed in {r.zone} (code {r.code})", ACTOR)
            if self._burned is not None:
                self._burned(relay_marks.relay_named(config, r.relay).pool)
            return text
        except (OperationError, OSError, sqlite3.Error) as exc:
            log.error("reputation_burn_failed relay=%s zone=%s reason=%r action=%r", r.relay,
                      r.zone, str(exc), f"sendmail-shim-admin relay burn {r.relay}")
            return (f"burning relay {r.relay} FAILED ({exc}); burn it by hand: "
                    f"sendmail-shim-admin relay burn {r.relay}")
