"""Reading stdin like Postfix's sendmail: line endings, lone dots, From_ lines, size cap.

The parity class feeds Debian's Postfix sendmail the same bytes and compares what
Postfix stored (postcat) with what we read, byte for byte.  One difference on
purpose: a CR that does not end a line (Postfix keeps it as data and sends it
on) is refused in the header block and a line end in the body (wire/lineends.py).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import pytest

from sendmail_shim.frontend.sendmail import MessageTooBig, read_message
from sendmail_shim.wire.lineends import LineEndError


def read(data: bytes, ignore_dots: bool = False, limit: int = 1 << 20) -> bytes:
    return read_message(io.BytesIO(data), ignore_dots, limit)


class TestReadMessage:
    def test_crlf_becomes_lf(self) -> None:
        assert read(b"Subject: x\r\n\r\nbody\r\n") == b"Subject: x\n\nbody\n"

    def test_mixed_line_endings_and_a_lone_cr_in_the_body_is_a_line_end(self) -> None:
        # Postfix keeps "x\ry" as one line and sends the bare CR on; the line-ending rule
        # (wire/lineends.py) makes it the line end aiosmtplib and mail readers saw anyway.
        assert read(b"A: 1\r\nB: 2\n\nx\ry\r\n") == b"A: 1\nB: 2\n\nx\ny\n"

    def test_cr_cr_lf_is_one_line_end(self) -> None:
        assert read(b"A: 1\r\r\n\r\r\nx\r\r\n") == b"A: 1\n\nx\n"

    def test_a_lone_cr_in_the_header_block_is_refused(self) -> None:
        with pytest.raises(LineEndError, match="line 2 of the header block"):
            read(b"To: a@example.net\nSubject: x\rBcc: b@example.net\n\nbody\n")

    def test_lone_dot_ends_without_i(self) -> None:
        assert read(b"A: 1\n\nbody\n.\nmore\n") == b"A: 1\n\nbody\n"

    def test_lone_dot_crlf_ends_without_i(self) -> None:
        assert read(b"A: 1\r\n\r\nbody\r\n.\r\nmore\r\n") == b"A: 1\n\nbody\n"

    def test_lone_dot_is_data_with_i(self) -> None:
        assert read(b"A: 1\n\nbody\n.\nmore\n", ignore_dots=True) == b"A: 1\n\nbody\n.\nmore\n"

    def test_doubled_dots_are_kept(self) -> None:
        assert read(b"A: 1\n\n..x\n") == b"A: 1\n\n..x\n"

    def test_from_line_dropped(self) -> None:
        assert read(b"From me Mon Nov 23\nA: 1\n\nx\n") == b"A: 1\n\nx\n"

    def test_missing_final_newline_added(self) -> None:
        assert read(b"A: 1\n\nx") == b"A: 1\n\nx\n"

    def test_stdin_drained_after_lone_dot(self) -> None:
        stream = io.BytesIO(b"A: 1\n\n.\n" + b"z" * 500_000)
        read_message(stream, False, 1 << 20)
        assert stream.read() == b""

    def test_dot_across_chunk_seam(self) -> None:
        data = b"A: 1\n\n" + b"x" * (65536 - 7) + b"\n.\nafter\n"
        assert read(data) == b"A: 1\n\n" + b"x" * (65536 - 7) + b"\n"

    def test_size_cap(self) -> None:
        with pytest.raises(MessageTooBig):
            read(b"A: 1\n\n" + b"x" * 2000, limit=1000)

    def test_crlf_message_at_cap_fits(self) -> None:
        body = b"x\r\n" * 300  # 900 bytes raw, 600 after CRLF -> LF
        assert len(read(body, limit=600)) == 600


POSTFIX = "/usr/sbin/postdrop"


@pytest.fixture(scope="module")
def postfix_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A private Postfix configuration directory (``sendmail -C``) with its own queue.

    No master runs for it, so no pickup takes the maildrop file before the test reads
    it, whether or not the system's Postfix runs; the system's files are not touched.
    Root may name any configuration directory (Postfix trusts the super-user; others
    need alternate_config_directories in the default main.cf).
    """
    if os.geteuid() != 0 or not os.path.exists(POSTFIX):
        pytest.skip("needs root and Debian's postfix")
    conf = tmp_path_factory.mktemp("postfix")
    template = "/etc/postfix/main.cf"
    if not os.path.exists(template):
        template = "/usr/share/postfix/main.cf.debian"
    with open(template) as src, open(conf / "main.cf", "w") as dst:
        dst.write(src.read())
        dst.write(f"\nqueue_directory = {conf}/spool\ndata_directory = {conf}/data\n")
    maildrop = conf / "spool" / "maildrop"
    maildrop.mkdir(parents=True)
    shutil.chown(maildrop, "postfix", "postdrop")
    maildrop.chmod(0o1730)  # Postfix's own mode for maildrop/
    return str(conf)


def postfix_stores(conf: str, args: list[str], data: bytes) -> bytes:
    """What Postfix's sendmail (and postdrop) store for ``args`` and ``data``, as postcat shows."""
    maildrop = os.path.join(conf, "spool", "maildrop")
    before = set(os.listdir(maildrop))
    # postdrop warns on stderr that no pickup listens: captured, and the file stays.
    subprocess.run(["/usr/sbin/sendmail", "-C", conf, *args], input=data, check=True,
                   capture_output=True)
    new = sorted(set(os.listdir(maildrop)) - before)
    assert len(new) == 1
    path = os.path.join(maildrop, new[0])
    try:
        return subprocess.run(["postcat", "-c", conf, "-bh", path], check=True,
                              capture_output=True).stdout
    finally:
        os.unlink(path)


CASES = [
    (["-i"], b"Subject: a\r\n\r\nbody\r\n.\r\nstill body\r\n"),
    ([], b"Subject: a\r\n\r\nbody\r\n.\r\nafter the dot\r\n"),
    ([], b"Subject: a\n\nbody\n..two dots\n...three\n"),
    (["-oi"], b"From sender@x Mon Nov 23 00:00:00 2026\nSubject: a\n\nbody\n"),
    ([], b"Subject: mixed\r\nX: y\n\r\nline with crlf\r\nlast"),
    (["-i"], b"Subject: utf8 \xc3\xa9\n\n\xe2\x82\xac 8-bit body\n"),
    ([], b".\nnothing before the dot\n"),
    (["-i"], b"Subject: no body"),
]


class TestPostfixParity:
    """Same argv and stdin as Debian's Postfix sendmail: same stored bytes."""

    @pytest.mark.parametrize(("flags", "data"), CASES)
    def test_same_bytes_as_postfix(self, postfix_config: str, flags: list[str],
                                   data: bytes) -> None:
        theirs = postfix_stores(postfix_config, [*flags, "rcpt@example.test"], data)
        if theirs and not theirs.endswith(b"\n"):
            # Postfix keeps an unterminated last line as a continuation record, which
            # postcat prints bare and Postfix's smtp client ends with CRLF on the wire.
            theirs += b"\n"
        ours = read(data, ignore_dots="-i" in flags or "-oi" in flags)
        assert ours == theirs
