"""Reading the YAML configuration (daemon and admin; never the front end).

Trusts: the file's owner (root or the operator); still, every key is checked
against the schema that ``model.py`` declares, unknown keys are errors (a typo
must not silently disable a limit), and each error names the file, the key
path and what is wrong (``<file>: sites.foo.quota.per_hour: ...``).
Guarantees: a :class:`Config` is complete and consistent; the two keys the
front end reads without YAML (``paths.read_frontend_settings``) read the same
here, or loading fails.

One generic pass (:class:`_Reader`) walks the declared keys of each
dataclass; the rules that relate keys to each other follow it as explicit
code: a relay's port follows its tls, clear text only to loopback, sites
inherit ``default_quota`` and ``outbreak``, reserved site names, accounts by
uid, routing pins need a local transport, and the front end's agreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, replace
from functools import cache
from typing import Any

import yaml

from sendmail_shim.config import fragments, plainyaml, schema
from sendmail_shim.config.errors import ConfigError
from sendmail_shim.config.model import (
    ADMIN_SITE,
    DEFAULT_POOL,
    ROUTES,
    Config,
    OutbreakRules,
    Quota,
    Relay,
    Site,
    keys_of,
    top_names,
)
from sendmail_shim.config.schema import Problem, Section, mapping
from sendmail_shim.wire import paths

# A class's cross-field rule, run on its values after the generic pass: (reader, values,
# the raw mapping, the key path).
_Finish = Callable[["_Reader", dict[str, Any], dict[str, Any], str], None]


class _Reader:
    """Walks the YAML tree along the schema, remembering the key path for errors."""

    def __init__(self) -> None:
        self.finishers: dict[type, _Finish] = {Relay: _finish_relay,
                                               OutbreakRules: _finish_outbreak}

    def values(self, cls: type, raw: Any, where: str, owner: str = "",
               bases: dict[str, Any] | None = None, skip: tuple[str, ...] = ()
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(field values of the keys present, the raw mapping) of ``raw`` read as ``cls``."""
        known, declared_keys = _plan(cls, skip)
        data = mapping(raw, where, known)
        for _, declared, _, _ in declared_keys:  # first what is missing, then what is wrong
            if declared.required and declared.name not in data:
                raise declared.kind.missing(where, declared.name)
        out: dict[str, Any] = {}
        for field_name, declared, group, sub in declared_keys:
            holder, at = data, where
            if group:
                at = _join(where, group)
                holder = mapping(data.get(group), at, _group_keys(cls, group))
            if sub not in holder:
                if bases and field_name in bases:
                    out[field_name] = bases[field_name]
                continue
            base = bases.get(field_name, MISSING) if bases else MISSING
            out[field_name] = self.read(declared.kind, holder[sub], _join(at, sub), owner, base)
        finish = self.finishers.get(cls)
        if finish is not None:
            finish(self, out, data, where)
        return out, data

    def read(self, kind: schema.Kind, value: Any, where: str, owner: str,
             base: Any = MISSING) -> Any:
        """One key's value; a section's is built from its own keys over ``base``."""
        if isinstance(kind, schema.Optional) and isinstance(kind.inner, Section):
            if value is None or (kind.falsy and not value):
                return None
            kind = kind.inner
        if not isinstance(kind, Section):
            return kind.read(value, where, owner)
        if kind.many:
            if not value:
                return ()
            if not isinstance(value, list):
                raise Problem(where, kind.error)
            return tuple(self.build(kind.cls, item, f"{where}[{i}]", owner)
                         for i, item in enumerate(value))
        if kind.disable and value is False:
            return None
        return self.build(kind.cls, value, where, owner, None if base is MISSING else base)

    def build(self, cls: type, raw: Any, where: str, owner: str = "", base: Any = None) -> Any:
        """An instance of ``cls`` read from ``raw``, over ``base`` (or the defaults) if given."""
        values, _ = self.values(cls, raw, where, owner)
        return replace(base, **values) if base is not None else cls(**values)


@cache  # once per class and skip: the loader reads 10,000 sites with the same plan
def _plan(cls: type, skip: tuple[str, ...]
          ) -> tuple[tuple[str, ...], tuple[tuple[str, schema.Key, str, str], ...]]:
    """(the keys a mapping read as ``cls`` may hold, its declared keys to read in order as
    (field name, key, group, name in the group))."""
    known = tuple(n for n in top_names(cls) if n not in skip)
    declared = tuple((f, k, *k.name.rpartition(".")[::2]) for f, k in keys_of(cls)
                     if k.name.split(".")[0] not in skip
                     and not isinstance(k.kind, schema.Deferred))
    return known, declared


def _join(where: str, name: str) -> str:
    return name if where == "top level" else f"{where}.{name}"


@cache
def _group_keys(cls: type, group: str) -> tuple[str, ...]:
    return tuple(k.name.split(".", 1)[1] for _, k in keys_of(cls)
                 if k.name.startswith(group + "."))


def _finish_relay(r: _Reader, values: dict[str, Any], data: dict[str, Any], where: str) -> None:
    """The port follows tls; clear text (site passwords!) only to loopback unless allowed."""
    tls = values.setdefault("tls", "starttls")
    values.setdefault("port", {"starttls": 587, "implicit": 465, "none": 25}[tls])
    host = values["host"]
    if tls == "none" and not values.get("allow_plaintext") and not schema.is_loopback(host):
        raise Problem(
            f"{where}.tls",
            f"'none' sends site passwords in clear text to {host}; use starttls or "
            "implicit, or set allow_plaintext: true if this network is trusted",
        )


def _finish_outbreak(r: _Reader, values: dict[str, Any], data: dict[str, Any],
                     where: str) -> None:
    """A rule given without its threshold is off (``quota_refusals: {window: 5m}``)."""
    for group, field_name in (("quota_refusals", "quota_refusals"),
                              ("relay_5xx_share", "relay_5xx_share"),
                              ("new_script", "new_script_count"),
                              ("spam_score", "spam_score_mean")):
        if group in data:
            values.setdefault(field_name, None)


def _site(r: _Reader, name: str, raw: Any, where: str, defaults: Config,
          with_uids: bool = True) -> Site:
    """A site over the top-level defaults (``default_quota``, ``outbreak``)."""
    outbreak = defaults.default_outbreak
    values, data = r.values(
        Site, raw, where, owner=name, skip=() if with_uids else ("uids",),
        bases={"quota": defaults.default_quota,
               "outbreak": outbreak if outbreak is not None else OutbreakRules()})
    if "outbreak" not in data:
        values["outbreak"] = outbreak
    return Site(name=name, **values)


def _keyed_by_text(value: Any, where: str) -> dict[str, Any]:
    """A mapping whose keys the operator names freely (uids, domains): keys as text.

    YAML reads ``1001:`` as a number; ``accounts`` takes uids, so it means "1001".
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Problem(where, f"expected a mapping, got {type(value).__name__}")
    return {str(name): body for name, body in value.items()}


def _finish_config(r: _Reader, values: dict[str, Any], data: dict[str, Any],
                   path: str | None, swap: dict[str, str | None] | None = None) -> Config:
    """The keys that depend on others: sites, default_site, accounts, routing."""
    config = Config(path=path, **values)
    sites_raw = data.get("sites") or {}
    if not isinstance(sites_raw, dict):
        raise Problem("sites", "expected a mapping of site name to site")
    for name in sites_raw:
        if str(name) in ("default", ADMIN_SITE):
            raise Problem(f"sites.{name}", "this name is reserved; choose another")
    sites = {str(name): _site(r, str(name), body, f"sites.{name}", config)
             for name, body in sites_raw.items()}
    origins = {name: f"{path} (sites.{name})" for name in sites}
    if path is not None:
        _add_fragments(r, config, sites, origins, swap)
    _check_claims(sites, origins)
    default = data.get("default_site", "refuse")
    default_site = None
    if default != "refuse":
        default_site = _site(r, "default", default, "default_site", config, with_uids=False)
    accounts_raw = _keyed_by_text(data.get("accounts"), "accounts")
    accounts = {}
    for name, body in accounts_raw.items():
        item = mapping(body, f"accounts.{name}", ("quota",))
        uid = schema.uid(int(name) if name.isdigit() else name, f"accounts.{name}")
        accounts[uid] = r.build(Quota, item.get("quota"), f"accounts.{name}.quota",
                                base=Quota())
    routing = {}
    for domain, choice in _keyed_by_text(data.get("routing"), "routing").items():
        try:
            key = domain.lower().rstrip(".").encode("idna").decode("ascii")
        except UnicodeError:
            raise Problem(f"routing.{domain}", "not a valid domain name") from None
        routing[key] = schema.Choice(ROUTES).read(choice, f"routing.{domain}", "")
    if "local" in routing.values() and config.local_transport is None:
        raise Problem("routing", "a domain is pinned to local but local_transport is not set")
    config = replace(config, sites=sites, default_site=default_site, accounts=accounts,
                     routing=routing)
    _check_pools(config)
    _check_dkim_update(config)
    return config


def _add_fragments(r: _Reader, config: Config, sites: dict[str, Site],
                   origins: dict[str, str], swap: dict[str, str | None] | None) -> None:
    """The sites of ``sites_dir`` after those of ``sites:``; then who claims what.

    Errors name the fragment's file (and the line of the key when known), or
    both files of a clash; they are ConfigErrors, not Problems, so that
    ``parse_config`` does not prefix the main file's name.
    """
    directory = fragments.directory_of(config.path, config.sites_dir)
    for fragment in fragments.read_all(directory, swap):
        name = fragment.name
        if name in sites:
            raise ConfigError(f"site {name} is defined twice: in {origins[name]} and in "
                              f"{fragment.path}; remove one")
        if name in ("default", ADMIN_SITE):
            raise ConfigError(f"{fragment.path}: the site name {name} is reserved; rename "
                              "the file")
        try:
            sites[name] = _site(r, name, fragment.raw, "top level", config)
        except Problem as problem:
            raise ConfigError(f"{fragment.path}: {fragment.where(problem)}") from None
        origins[name] = fragment.path


def _check_claims(sites: dict[str, Site], origins: dict[str, str]) -> None:
    """A domain belongs to one site; one uid's sites do not share a docroot.

    A site could otherwise send as another's domain (its sender policy and DKIM
    key follow the domain), or the docroot hint could not tell two sites of one
    uid apart.  One pass with indexes: linear in the number of sites.
    """
    domains: dict[str, str] = {}
    docroots: dict[tuple[int, str], str] = {}
    for site in sites.values():
        for domain in site.domains:
            other = domains.setdefault(domain, site.name)
            if other != site.name:
                raise ConfigError(
                    f"domain {domain} is claimed by site {other} ({origins.get(other, other)}) "
                    f"and by site {site.name} ({origins.get(site.name, site.name)}): a domain "
                    "belongs to one site; remove it from one of them")
        for uid in set(site.uids):
            for root in set(site.docroots):
                other = docroots.setdefault((uid, root), site.name)
                if other != site.name:
                    raise ConfigError(
                        f"uid {uid} has docroot {root} in site {other} "
                        f"({origins.get(other, other)}) and in site {site.name} "
                        f"({origins.get(site.name, site.name)}): the docroot could not tell "
                        "them apart; give each site its own docroot")


def _check_dkim_update(config: Config) -> None:
    """DNS UPDATE needs its server, its TSIG key and a zone, all three."""
    dkim = config.dkim
    if not (dkim.update_server or dkim.update_key_file):
        return
    if not dkim.update_server or not dkim.update_key_file:
        raise Problem("dkim", "DNS UPDATE needs both update_server and update_key_file")
    if not (dkim.update_zone or dkim.delegate_zone):
        raise Problem("dkim", "DNS UPDATE needs a zone: set update_zone (or delegate_zone)")


def _check_pools(config: Config) -> None:
    """Relay names are unique; pools are named once; relays and sites name known pools."""
    seen: set[str] = set()
    for i, relay in enumerate(config.relays):
        if relay.ident in seen:
            raise Problem(f"relays[{i}]", f"a second relay named {relay.ident}; give each "
                                          "relay its own name:")
        seen.add(relay.ident)
    names = [pool.name for pool in config.pools]
    for i, pool in enumerate(config.pools):
        if pool.name in names[:i]:
            raise Problem(f"pools[{i}].name", f"pool {pool.name} is declared twice")
        low, high = pool.min_score, pool.max_score
        if low is not None and high is not None and low >= high:
            raise Problem(f"pools[{i}]", "min_score must lie below max_score")
    known = {DEFAULT_POOL, *names}
    wanted = [(f"relays[{i}].pool", r.pool) for i, r in enumerate(config.relays)]
    wanted += [(f"sites.{s.name}.pool", s.pool) for s in config.sites.values() if s.pool]
    if config.default_site is not None and config.default_site.pool:
        wanted.append(("default_site.pool", config.default_site.pool))
    if config.scan.unscored_pool:
        wanted.append(("scan.unscored_pool", config.scan.unscored_pool))
    for where, name in wanted:
        if name not in known:
            raise Problem(where, f"no pool {name!r} in pools: (pools: "
                                 f"{', '.join(sorted(known))})")


def parse_config(raw: Any, path: str | None,
                 swap: dict[str, str | None] | None = None) -> Config:
    """Build a :class:`Config` from the YAML tree ``raw`` read from ``path``.

    With a ``path``, the site fragments of ``sites_dir`` join ``sites:``
    (``fragments.py``); ``swap`` replaces some of them (``fragments.read_all``).
    """
    r = _Reader()
    try:
        with plainyaml.collector_paused():  # 10,000 sites: 60,000 objects that all stay
            values, data = r.values(Config, raw, "top level")
            config = _finish_config(r, values, data, path, swap)
    except Problem as problem:
        raise ConfigError(f"{path or '<built-in defaults>'}: {problem}") from None
    if path is not None:  # a tree built in memory has no file for the front end to read
        _check_frontend_agrees(config, path)
    return config


def _check_frontend_agrees(config: Config, path: str | None) -> None:
    """The front end reads spool and message_size_limit without YAML: same values?"""
    try:
        spool, limit = paths.frontend_spool_and_limit(path)
    except paths.SettingsError as exc:
        raise ConfigError(f"{exc} (the sendmail front end reads this line without YAML)") from exc
    if spool != config.spool or limit != config.message_size_limit:
        raise ConfigError(
            f"{config.path}: spool/message_size_limit: write each as one plain top-level "
            "line ('spool: /path', 'message_size_limit: 10240000'): the sendmail front end "
            f"reads them without a YAML parser and saw spool={spool!r}, "
            f"message_size_limit={limit}"
        )


def load_config(explicit: str | None = None,
                swap: dict[str, str | None] | None = None) -> Config:
    """Find (``paths.find_config``), read and check the configuration and its fragments.

    ``swap``: the admin command's check of a fragment before it is put in
    place (``fragments.read_all``).
    """
    path = paths.find_config(explicit)
    if path is None:
        return parse_config({}, None)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = plainyaml.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(raw, path, swap)
