"""daemon.listing: the mailq text made entry by entry and sent in chunks."""

from __future__ import annotations

from sendmail_shim.daemon import listing
from sendmail_shim.store import spool
from sendmail_shim.wire import paths

from .conftest import MakeEnvelope, QueueMessage

NOW = 1_700_000_100.0


def entry(make_envelope: MakeEnvelope, **fields: object) -> spool.QueueEntry:
    return spool.QueueEntry(spool.INCOMING, make_envelope(**fields), spool.Status())


def test_empty_queue() -> None:
    assert list(listing.queue_text([], NOW)) == [listing.EMPTY]
    assert "".join(listing.queue_text([], NOW)) == "Mail queue is empty\n"


def test_one_piece_per_entry_and_the_total(make_envelope: MakeEnvelope) -> None:
    entries = [entry(make_envelope), entry(make_envelope, recipients=["a@x.test", "b@x.test"])]
    pieces = list(listing.queue_text(entries, NOW))
    assert pieces[0] == listing.HEADER and len(pieces) == 4
    assert pieces[1].endswith("someone@example.net\n\n")
    assert pieces[2].endswith("b@x.test\n\n")
    assert pieces[3] == "-- 1 Kbytes in 2 Requests.\n"
    text = "".join(listing.queue_text(entries, NOW))
    assert text.endswith("\n\n-- 1 Kbytes in 2 Requests.\n")
    assert text.count("-Queue ID-") == 1


def test_entries_are_taken_one_at_a_time(make_envelope: MakeEnvelope) -> None:
    taken = []

    def source() -> object:
        for _ in range(3):
            taken.append(1)
            yield entry(make_envelope)

    pieces = listing.queue_text(source(), NOW)  # type: ignore[arg-type]
    next(pieces)
    assert len(taken) == 1


def test_chunks_join_to_the_text_and_stay_near_the_size(make_envelope: MakeEnvelope) -> None:
    entries = [entry(make_envelope, sender="caf\udce9@x.test") for _ in range(300)]
    chunks = list(listing.chunks(listing.queue_text(entries, NOW), size=4096))
    assert len(chunks) > 5 and all(len(c) < 4096 + 400 for c in chunks)
    assert b"".join(chunks) == "".join(listing.queue_text(entries, NOW)).encode()
    assert b"caf\\xe9@x.test" in chunks[0]  # escaped for the listing, one line per entry


def test_the_spool_streamed(spool_layout: paths.SpoolLayout,
                            queue_message: QueueMessage) -> None:
    for _ in range(5):
        queue_message()
    text = b"".join(listing.chunks(listing.queue_text(spool.entries(spool_layout), NOW)))
    assert text.decode().endswith("in 5 Requests.\n")
