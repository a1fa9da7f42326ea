"""Run many front-end invocations as a site user, fast: one process, a fork per case.

The fuzz tests (test_fuzz.py) start this file's :data:`SERVER` with the test
virtualenv's Python under ``runuser -u <site user>``.  It imports the front end
once, then for each request line (JSON: ``argv``, ``stdin`` in base64) forks a
child that runs ``sendmail_shim.frontend.sendmail.run(argv)`` with that stdin and with
stdout and stderr captured, exactly as the installed ``sendmail-shim`` would
(same code, same uid, same configuration), and answers one JSON line: the exit
status, stdout, stderr, and ``crashed`` when ``run`` raised instead of
returning a status (a traceback a real caller would have seen).

A fork costs about a millisecond where a new interpreter costs ten, so CI can
afford a few thousand cases.
"""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

SERVER = r'''
import base64, json, os, sys, time, traceback
from sendmail_shim.frontend import sendmail
import sendmail_shim.frontend.bs  # -bs cases fork from a warm import too

def one(case):
    data = base64.b64decode(case["stdin"])
    fds = [os.memfd_create(n) for n in ("in", "out", "err")]
    os.write(fds[0], data)
    os.lseek(fds[0], 0, 0)
    pid = os.fork()
    if pid == 0:
        try:
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
            sys.stdin = open(0, "r", closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            code = sendmail.run(case["argv"])
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 199)
        except SystemExit as exc:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(exc.code if isinstance(exc.code, int) else 198)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(197)
    deadline = time.monotonic() + case.get("timeout", 30)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = -1
            break
        time.sleep(0.001)
    out = []
    for fd in fds[1:]:
        os.lseek(fd, 0, 0)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        out.append(b"".join(chunks))
    for fd in fds:
        os.close(fd)
    code = os.waitstatus_to_exitcode(status) if status != -1 else -1
    return {"code": code, "crashed": code in (197, 198, 199), "timeout": status == -1,
            "stdout": base64.b64encode(out[0]).decode(),
            "stderr": base64.b64encode(out[1]).decode()}

for line in sys.stdin:
    sys.stdout.write(json.dumps(one(json.loads(line))) + "\n")
    sys.stdout.flush()
'''


class ForkServer:
    """One ``SERVER`` process as ``user``; :meth:`run` is one front-end invocation."""

    def __init__(self, python: str, user: str, env: dict[str, str], cwd: str) -> None:
        env_words = [f"{k}={v}" for k, v in env.items()]
        self.proc = subprocess.Popen(
            ["runuser", "-u", user, "--", "env", *env_words, python, "-c", SERVER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd, env=env)

    def run(self, argv: list[str], stdin: bytes, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        case = {"argv": argv, "stdin": base64.b64encode(stdin).decode(), "timeout": timeout}
        self.proc.stdin.write(json.dumps(case).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("the fork server died")
        result: dict[str, Any] = json.loads(line)
        result["stdout"] = base64.b64decode(result["stdout"])
        result["stderr"] = base64.b64decode(result["stderr"])
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)
