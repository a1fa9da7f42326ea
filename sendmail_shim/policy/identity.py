"""Who is sending: kernel uid (+ hints) to a configured site.

Trusts: the uid, and only the uid, because the kernel vouches for it
(SO_PEERCRED on the socket, st_uid of a drop file).  The working directory
and the X-PHP-Originating-Script header are hints written by the caller: they
only choose among the sites that already belong to that uid, never widen them.
Guarantees: a uid listed by no site gets ``default_site`` or a refusal; an
explicit ``--site`` naming a site that is not the uid's is refused; a docroot
hint that matches none of the uid's sites falls back to the uid's first site
(the order in the configuration), and the choice is reported for the log.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from sendmail_shim.config import Config, Site


@dataclass(frozen=True)
class Caller:
    """What the kernel says about the caller, plus its hints."""

    uid: int
    gid: int
    pid: int | None  # None for drop files: the writer is gone
    cwd: str | None = None
    script: str | None = None  # from X-PHP-Originating-Script: "<uid>:<script>"
    site_hint: str | None = None  # --site, set by the operator in the FPM pool


@dataclass(frozen=True)
class Identification:
    site: Site | None  # None: refused
    reason: str  # for the log and for a refusal text


def _under(path: str, root: str) -> bool:
    path = os.path.normpath(path)
    return path == root or path.startswith(root.rstrip("/") + "/")


def identify(config: Config, caller: Caller) -> Identification:
    """The site a message from ``caller`` belongs to."""
    candidates = config.sites_of_uid(caller.uid)
    if not candidates:
        if config.default_site is not None:
            return Identification(config.default_site, f"uid {caller.uid} is in no site: default")
        return Identification(
            None,
            f"uid {caller.uid} belongs to no site in {config.path or 'the configuration'}; "
            "the operator must add it to a site's uids (sendmail-shim-admin config check)",
        )
    if caller.site_hint is not None:
        for site in candidates:
            if site.name == caller.site_hint:
                return Identification(site, f"uid {caller.uid}, --site {site.name}")
        return Identification(
            None,
            f"--site {caller.site_hint!r} is not a site of uid {caller.uid} (its sites: "
            f"{', '.join(s.name for s in candidates)}); fix the sendmail_path of this PHP pool",
        )
    if len(candidates) == 1:
        return Identification(candidates[0], f"uid {caller.uid}")
    if caller.cwd:
        best: tuple[int, Site] | None = None
        for site in candidates:
            for root in site.docroots:
                if _under(caller.cwd, root) and (best is None or len(root) > best[0]):
                    best = (len(root), site)
        if best is not None:
            return Identification(best[1], f"uid {caller.uid}, docroot hint {caller.cwd}")
    return Identification(
        candidates[0], f"uid {caller.uid} owns several sites, no hint matched: first listed"
    )


def daemon_uids(config: Config) -> set[int]:
    """Root and the daemon's user (``firewall.daemon_user``, else the spool's owner)."""
    uids = {0}
    if config.firewall.daemon_user:
        uids.add(pwd.getpwnam(config.firewall.daemon_user).pw_uid)
    elif os.path.isdir(config.spool):
        uids.add(os.stat(config.spool).st_uid)  # the spool's owner is the daemon's user
    return uids


def exempt_uids(config: Config) -> list[int]:
    """Uids the firewall lets out directly: root, the daemon's user, ``exempt_users``."""
    uids = daemon_uids(config)
    for user in config.firewall.exempt_users:
        uids.add(pwd.getpwnam(user).pw_uid)
    return sorted(uids)
