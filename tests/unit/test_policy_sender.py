"""policy/sender.py: a site never borrows a neighbour's hosted domain (issue 21, fresh attack).

With the default ``sender_policy: {envelope: rewrite, from_header: keep}`` a site's
From: in ANOTHER hosted site's domain used to leave unchanged under the site's own
relay login, and a site hosted on a subdomain of a neighbour's domain could be
spoken for by that neighbour.  An address belongs to the site owning the most
specific hosted domain that matches it; a neighbour's address is never kept.
"""

from __future__ import annotations

import dataclasses

import pytest

from sendmail_shim.config import Config
from sendmail_shim.policy.sender import apply_sender_policy, hosted_owners, is_sites
from sendmail_shim.store.envelope import Envelope

from .conftest import SITE1, SITE2, MakeConfig, MakeEnvelope

SHOP = f"shop.{SITE1}"  # hosted as a third site, below site1's domain


@pytest.fixture
def hosted(make_config: MakeConfig) -> Config:
    return make_config(sites={SHOP: {"uids": [4242], "domains": [SHOP]}})


def _apply(config: Config, envelope: Envelope, message: bytes,
           **policy: str) -> tuple[bytes, list[tuple[str, str]]]:
    site = config.sites[SITE1]
    if policy:
        site = dataclasses.replace(site, **policy)  # a frozen dataclass: a copy
    result = apply_sender_policy(site, config, envelope, message)
    assert isinstance(result, tuple), result
    return result


class TestOwnership:
    """The most specific hosted domain decides whose an address is."""

    def test_a_subdomain_hosted_as_another_site_is_that_sites(self, hosted: Config) -> None:
        assert hosted_owners(f"orders@{SHOP}", hosted) == {SHOP}
        assert hosted_owners(f"x@mail.{SHOP}", hosted) == {SHOP}
        assert hosted_owners(f"x@www.{SITE1}", hosted) == {SITE1}
        assert hosted_owners("x@gmail.example", hosted) == frozenset()
        assert not is_sites(f"orders@{SHOP}", hosted.sites[SITE1], hosted)
        assert is_sites(f"web@www.{SITE1}", hosted.sites[SITE1], hosted)
        assert is_sites(f"orders@{SHOP.upper()}.", hosted.sites[SHOP], hosted)


class TestEnvelope:
    def test_rewrite_takes_back_a_neighbours_subdomain(self, hosted: Config,
                                                       make_envelope: MakeEnvelope) -> None:
        envelope = make_envelope(b"Subject: x\n\nbody\n", sender=f"orders@{SHOP}")
        _message, notes = _apply(hosted, envelope, b"Subject: x\n\nbody\n")
        assert envelope.sender == f"noreply@{SITE1}"
        assert ("sender_rewritten_from", f"orders@{SHOP}") in notes

    def test_keep_never_keeps_a_neighbours_address(self, hosted: Config,
                                                  make_envelope: MakeEnvelope) -> None:
        for borrowed in (f"ceo@{SITE2}", f"orders@{SHOP}"):
            envelope = make_envelope(b"Subject: x\n\nbody\n", sender=borrowed)
            _apply(hosted, envelope, b"Subject: x\n\nbody\n", envelope_policy="keep")
            assert envelope.sender == f"noreply@{SITE1}", borrowed
        outside = make_envelope(b"Subject: x\n\nbody\n", sender="bounce@esp.example")
        _apply(hosted, outside, b"Subject: x\n\nbody\n", envelope_policy="keep")
        assert outside.sender == "bounce@esp.example"  # keep still keeps the outside world


class TestFromHeader:
    def test_keep_rewrites_a_neighbours_from_with_reply_to(self, hosted: Config,
                                                          make_envelope: MakeEnvelope) -> None:
        for borrowed in (f"ceo@{SITE2}", f"orders@{SHOP}"):
            message = f"From: CEO <{borrowed}>\nTo: a@example.net\n\nbody\n".encode()
            out, notes = _apply(hosted, make_envelope(message), message)
            assert f"From: \"CEO via {SITE1}\" <noreply@{SITE1}>\n".encode() in out, out
            assert f"Reply-To: CEO <{borrowed}>\n".encode() in out
            assert ("from_rewritten", borrowed) in notes

    def test_keep_keeps_a_visitors_outside_address(self, hosted: Config,
                                                  make_envelope: MakeEnvelope) -> None:
        message = b"From: Visitor <visitor@gmail.example>\nTo: a@example.net\n\nbody\n"
        out, notes = _apply(hosted, make_envelope(message), message)
        assert out == message and notes == []

    def test_refuse_names_the_neighbours_address(self, hosted: Config,
                                                 make_envelope: MakeEnvelope) -> None:
        message = f"From: <orders@{SHOP}>\n\nbody\n".encode()
        site = hosted.sites[SITE1]
        site = dataclasses.replace(site, from_policy="refuse")
        verdict = apply_sender_policy(site, hosted, make_envelope(message), message)
        assert not isinstance(verdict, tuple)
        assert verdict.code == 550 and f"orders@{SHOP}" in verdict.text
