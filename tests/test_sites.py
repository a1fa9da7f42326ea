"""site add/change/remove and the control panel hooks, end to end (issue 23 parts 1-3).

Real Unix users, the daemon running as its own user, the capture relay.  The
configuration's ``relay_login_command`` is a small script that adds the login
to the capture relay's logins file (read at each connection), so a site added
by a panel hook sends under its own login at once, as with a relay's sasldb.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import threading
import time
from typing import Any

import pytest
from conftest import ADMIN, DAEMON_USER, Relay, Shim, ensure_user, free_port, wait_until

from sendmail_shim.wire import client, protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANELS = os.path.join(REPO, "packaging", "panels")
CPANEL = os.path.join(PANELS, "cpanel", "sendmail-shim-cpanel-hook")
PLESK = os.path.join(PANELS, "plesk", "sendmail-shim-plesk-event")
VIRTUALMIN = os.path.join(PANELS, "virtualmin", "sendmail-shim-virtualmin")
PANEL_USERS = ("shimpanel1", "shimpanel2", "shimpanel3", "shimpanel4")
MESSAGE = b"To: someone@example.net\nSubject: from a new site\n\nhello\n"
RELAY_COMMAND = """#!/bin/sh
# relay_login_command of the tests: the capture relay's logins file is the relay's sasldb
set -e
case "$1" in
add) IFS= read -r password; printf '%s:%s\\n' "$2" "$password" >> {logins} ;;
remove) grep -v "^$2:" {logins} > {logins}.new || true; mv {logins}.new {logins} ;;
*) exit 64 ;;
esac
"""


@pytest.fixture(scope="module")
def panel_users() -> dict[str, pwd.struct_passwd]:
    return {name: ensure_user(name) for name in PANEL_USERS}


@pytest.fixture
def panel(shim_factory: Any, workdir: str, panel_users: Any) -> tuple[Shim, Relay]:
    """A running daemon whose relay_login_command creates logins at the running relay."""
    make_relay, make_shim = shim_factory
    port = free_port()
    script = os.path.join(workdir, "relay-login")
    with open(script, "w") as fh:
        fh.write(RELAY_COMMAND.format(logins=os.path.join(workdir, f"relay-{port}.logins")))
    os.chmod(script, 0o755)
    shim = make_shim([port], extra=f"relay_login_command: {script}\n")
    relay = make_relay(shim.logins, port)
    relay.start()
    shim.start()
    return shim, relay


def admin(shim: Shim, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([ADMIN, *args], input=stdin, capture_output=True, text=True,
                          env=shim.env(), timeout=180)


def answer(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.stdout, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def section(result: dict[str, Any], name: str) -> dict[str, Any]:
    found = [s for s in result["sections"] if s["section"] == name]
    assert found, result
    return found[0]  # type: ignore[no-any-return]


def files(shim: Shim) -> dict[str, bytes]:
    """Every file of sites.d and secrets/ (hidden ones too, the lock aside) with its bytes."""
    out = {}
    for sub in ("sites.d", "secrets"):
        directory = os.path.join(shim.workdir, sub)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            if name != ".lock":
                with open(os.path.join(directory, name), "rb") as fh:
                    out[f"{sub}/{name}"] = fh.read()
    return out


def site_names(shim: Shim) -> set[str]:
    done = admin(shim, "site", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {json.loads(line)["site"] for line in done.stdout.splitlines() if line.strip()}


def delivered_as(relay: Relay, login: str, count: int = 1) -> None:
    wait_until(lambda: sum(m["login"] == login for m, _ in relay.messages()) >= count, 30,
               f"{count} message(s) at the relay as {login}")


def test_add_change_remove_with_a_running_daemon(panel: tuple[Shim, Relay]) -> None:
    shim, relay = panel
    done = admin(shim, "site", "add", "new.test", "--uid", "shimpanel1", "--domain", "new.test",
                 "--docroot", "/home/shimpanel1/public_html", "--password-stdin", "--json",
                 stdin="a-good-secret-123\n")
    assert done.returncode == 0, done.stderr
    result = answer(done)
    assert result["changed"] is True
    assert [s["section"] for s in result["sections"]] == ["site", "password", "dkim", "daemon",
                                                          "relay"]
    assert section(result, "daemon")["state"] == "reloaded"
    assert section(result, "relay")["ok"] is True
    # The site's DKIM key: made pending, owned by the daemon, its record printed to publish.
    dkim = section(result, "dkim")
    assert dkim["state"] == "keys made", dkim
    [made] = dkim["made"]
    domain, selector = made.split()[:2]
    assert domain == "new.test"
    assert any(line.startswith(f"{selector}._domainkey.new.test. IN TXT \"v=DKIM1; k=rsa; p=")
               for line in dkim["publish"]), dkim["publish"]
    key_file = os.path.join(shim.spool, "dkim", "new.test", selector + ".pem")
    key_st = os.stat(key_file)
    assert (key_st.st_uid, key_st.st_mode & 0o777) == (pwd.getpwnam(DAEMON_USER).pw_uid, 0o600)
    fragment = os.path.join(shim.workdir, "sites.d", "new.test.yaml")
    secret = os.path.join(shim.workdir, "secrets", "new.test")
    st = os.stat(secret)
    daemon_gid = pwd.getpwnam(DAEMON_USER).pw_gid
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, daemon_gid, 0o640)
    assert os.stat(fragment).st_mode & 0o7777 == 0o644
    with open(secret) as fh:
        assert fh.read() == "a-good-secret-123\n"
    assert "new.test" in site_names(shim)
    assert shim.sendmail(["-t", "-i"], MESSAGE, user="shimpanel1").returncode == 0
    delivered_as(relay, "new.test")

    done = admin(shim, "site", "change", "new.test", "--domain", "new.test", "--domain",
                 "www.new.test", "--per-hour", "5", "--json")
    assert done.returncode == 0, done.stderr
    assert section(answer(done), "site")["domains"] == ["new.test", "www.new.test"]
    assert [m.split()[0] for m in section(answer(done), "dkim")["made"]] == ["www.new.test"]
    again = admin(shim, "site", "change", "new.test", "--per-hour", "5", "--json")
    assert answer(again)["changed"] is False  # idempotent
    done = admin(shim, "site", "change", "new.test", "--login", "renamed.test", "--json")
    assert done.returncode == 0, done.stderr
    relays = [s["command"] for s in answer(done)["sections"] if s["section"] == "relay"]
    assert [c.split()[1:] for c in relays] == [["add", "renamed.test"], ["remove", "new.test"]]
    assert shim.sendmail(["-t", "-i"], MESSAGE, user="shimpanel1").returncode == 0
    delivered_as(relay, "renamed.test")

    done = admin(shim, "site", "remove", "new.test", "--json")
    assert done.returncode == 0, done.stderr
    assert section(answer(done), "daemon")["state"] == "reloaded"
    assert not os.path.exists(fragment) and not os.path.exists(secret)
    assert "new.test" not in site_names(shim)
    refused = shim.sendmail(["-t", "-i"], MESSAGE, user="shimpanel1")
    assert refused.returncode == 77, refused.stderr
    with open(relay.logins_file) as fh:
        logins = fh.read()
    assert "new.test:" not in logins and "renamed.test:" not in logins
    gone = admin(shim, "site", "remove", "new.test", "--json")  # idempotent
    assert gone.returncode == 0 and answer(gone)["changed"] is False


def test_a_generated_password_is_shown_once(panel: tuple[Shim, Relay]) -> None:
    shim, relay = panel
    done = admin(shim, "site", "add", "gen.test", "--uid", "shimpanel2", "--domain", "gen.test")
    assert done.returncode == 0, done.stderr
    with open(os.path.join(shim.workdir, "secrets", "gen.test")) as fh:
        password = fh.read().strip()
    assert done.stdout.count(password) == 1
    again = admin(shim, "site", "add", "gen.test", "--uid", "shimpanel2", "--domain", "gen.test")
    assert again.returncode == 0, again.stderr
    assert password not in again.stdout and "unchanged" in again.stdout
    assert shim.sendmail(["-t", "-i"], MESSAGE, user="shimpanel2").returncode == 0
    delivered_as(relay, "gen.test")


BAD = {
    "site exists in the main file": (["site1.test", "--uid", "shimpanel1", "--domain",
                                      "x.test"], "", 73, "exists"),
    "site exists with other uids": (["old.test", "--uid", "shimpanel2", "--domain",
                                     "old.test"], "", 73, "use 'site change'"),
    "no such user": (["x.test", "--uid", "shimnosuchuser", "--domain", "x.test"], "", 67,
                     "no user 'shimnosuchuser'"),
    "no such uid": (["x.test", "--uid", "4012345", "--domain", "x.test"], "", 67,
                    "no user '4012345'"),
    "domain of another site": (["x.test", "--uid", "shimpanel1", "--domain", "site2.test"], "",
                               65, "domain site2.test belongs to site site2.test"),
    "docroot outside the home": (["x.test", "--uid", "shimpanel1", "--domain", "x.test",
                                  "--docroot", "/home/shimpanel2/public_html"], "", 65,
                                 "outside the home"),
    "docroot escaping the home": (["x.test", "--uid", "shimpanel1", "--domain", "x.test",
                                   "--docroot", "/home/shimpanel1/../shimpanel2"], "", 65,
                                  "outside the home"),
    "secret too short": (["x.test", "--uid", "shimpanel1", "--domain", "x.test",
                          "--password-stdin"], "short\n", 65, "the secret is not"),
    "secret with a colon": (["x.test", "--uid", "shimpanel1", "--domain", "x.test",
                             "--password-stdin"], "abc:defghijklmnop\n", 65, "the secret is not"),
    "secret with a space": (["x.test", "--uid", "shimpanel1", "--domain", "x.test",
                             "--password-stdin"], "abc defghijklmnop\n", 65, "the secret is not"),
    "bad site name": (["../x", "--uid", "shimpanel1", "--domain", "x.test"], "", 64,
                      "cannot be a site name"),
    "bad domain": (["x.test", "--uid", "shimpanel1", "--domain", "-x-"], "", 65,
                   "not a domain name"),
    "sender not an address (the whole-configuration check)": (
        ["x.test", "--uid", "shimpanel3", "--domain", "x.test", "--sender", "nobody"], "", 65,
        "x.test.yaml: line 5: sender: expected an address"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_changes_nothing(panel: tuple[Shim, Relay], case: str) -> None:
    shim, _ = panel
    first = admin(shim, "site", "add", "old.test", "--uid", "shimpanel1", "--domain",
                  "old.test")
    assert first.returncode == 0, first.stderr
    before = files(shim)
    with open(shim.config, "rb") as fh:
        config_before = fh.read()
    args, stdin, status, words = BAD[case]
    done = admin(shim, "site", "add", *args, "--json", stdin=stdin)
    assert done.returncode == status, (done.stdout, done.stderr)
    assert words in done.stderr, done.stderr
    assert answer(done)["status"] == status
    assert files(shim) == before
    with open(shim.config, "rb") as fh:
        assert fh.read() == config_before
    assert site_names(shim) == {"site1.test", "site2.test", "system", "old.test"}


def test_a_hand_written_yaml_error_is_refused_with_file_and_line(
        panel: tuple[Shim, Relay]) -> None:
    shim, relay = panel
    broken = os.path.join(shim.workdir, "sites.d", "broken.test.yaml")
    os.makedirs(os.path.dirname(broken), exist_ok=True)
    with open(broken, "w") as fh:
        fh.write("uids: [shimpanel3]\ndomains: [broken.test\n")
    checked = admin(shim, "config", "check")
    assert checked.returncode == 78
    assert f"{broken}: line 3, column 1: not valid YAML" in checked.stderr
    shim.signal_daemon(signal.SIGHUP)
    wait_until(lambda: "reload refused" in shim.daemon_log(), 15, "the refused reload")
    assert f"{broken}: line 3" in shim.daemon_log()
    # The control socket's reload (what site add sends) answers with the refusal.
    reply = client.ask(os.path.join(shim.spool, "control", "control.sock"),
                       protocol.encode_request(protocol.control_fields("reload", {}), b""), 60)
    assert (reply.code, reply.status) == (554, 78)
    assert f"{broken}: line 3, column 1: not valid YAML" in reply.text
    # The running configuration is kept: the sites still send.
    assert shim.sendmail(["-t", "-i"], MESSAGE, user="shimsite1").returncode == 0
    relay.wait(1)
    before = files(shim)
    done = admin(shim, "site", "add", "x.test", "--uid", "shimpanel1", "--domain", "x.test")
    assert done.returncode == 78 and broken in done.stderr
    assert files(shim) == before
    os.unlink(broken)
    assert admin(shim, "config", "check").returncode == 0


def test_parallel_commands_wait_for_each_other(panel: tuple[Shim, Relay]) -> None:
    """Four panel hooks at once, and the same add three times at once."""
    shim, relay = panel
    # What a command killed mid-way leaves: the next one cleans it under the lock.
    os.makedirs(os.path.join(shim.workdir, "sites.d"), exist_ok=True)
    for sub in ("sites.d", "secrets"):
        with open(os.path.join(shim.workdir, sub, ".p0.test.tmp-1-0123abcd"), "w") as fh:
            fh.write("uids: [")
    commands = [[ADMIN, "site", "add", f"p{i}.test", "--uid", user, "--domain", f"p{i}.test",
                 "--json"] for i, user in enumerate(PANEL_USERS)]
    commands += [[ADMIN, "site", "add", "same.test", "--uid", "shimstranger", "--domain",
                  "same.test", "--json"]] * 3
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=shim.env()) for c in commands]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outs
    results = [json.loads(out) for out, _ in outs]
    assert [r["changed"] for r in results[-3:]].count(True) == 1
    assert site_names(shim) >= {"p0.test", "p1.test", "p2.test", "p3.test", "same.test"}
    left = [n for n in os.listdir(os.path.join(shim.workdir, "sites.d")) if n.startswith(".")]
    assert left == [".lock"]
    assert not [n for n in os.listdir(os.path.join(shim.workdir, "secrets")) if ".tmp-" in n]
    for i, user in enumerate(PANEL_USERS):
        assert shim.sendmail(["-t", "-i"], MESSAGE, user=user).returncode == 0
        delivered_as(relay, f"p{i}.test")


def test_reload_under_load_loses_no_handoff(panel: tuple[Shim, Relay]) -> None:
    """Two sites hand off mail without pause while sites are added and removed (reloads)."""
    shim, relay = panel
    stop = threading.Event()
    results: list[int] = []
    lock = threading.Lock()

    def send(user: str) -> None:
        while not stop.is_set():
            code = shim.sendmail(["-t", "-i"], MESSAGE, user=user).returncode
            with lock:
                results.append(code)

    senders = [threading.Thread(target=send, args=(u,)) for u in ("shimsite1", "shimsite2")]
    for thread in senders:
        thread.start()
    try:
        for round_ in range(4):
            done = admin(shim, "site", "add", "load.test", "--uid", "shimpanel1", "--domain",
                         "load.test", "--json")
            assert done.returncode == 0, done.stderr
            assert section(answer(done), "daemon")["state"] == "reloaded"
            assert shim.sendmail(["-t", "-i"], MESSAGE, user="shimpanel1").returncode == 0
            delivered_as(relay, "load.test", round_ + 1)
            done = admin(shim, "site", "remove", "load.test", "--json")
            assert done.returncode == 0, done.stderr
    finally:
        stop.set()
        for thread in senders:
            thread.join(120)
    assert results and set(results) == {0}, results
    sent = len(results) + 4
    relay.wait(sent, 120)
    time.sleep(1)
    assert len(relay.messages()) == sent
    assert shim.daemon_log().count("reloaded ") >= 8


def test_remove_with_queued_mail_refuses_holds_or_forces(shim_factory: Any, workdir: str,
                                                         panel_users: Any) -> None:
    _, make_shim = shim_factory
    shim = make_shim([free_port()])  # no relay answers: the mail stays queued
    shim.start()
    for name, user in (("held.test", "shimpanel1"), ("forced.test", "shimpanel2")):
        assert admin(shim, "site", "add", name, "--uid", user, "--domain", name).returncode == 0
        assert shim.sendmail(["-t", "-i"], MESSAGE, user=user).returncode == 0
    wait_until(lambda: len(shim.queue_files("deferred")) >= 2, 30, "two deferred messages")
    done = admin(shim, "site", "remove", "held.test", "--json")
    assert done.returncode == 75 and "1 message(s) in the queue" in done.stderr
    assert "held.test" in site_names(shim)
    done = admin(shim, "site", "remove", "held.test", "--hold", "--json")
    assert done.returncode == 0, done.stderr
    assert section(answer(done), "queue")["held"] == 1
    assert shim.queue_files("hold")  # kept for the operator
    done = admin(shim, "site", "remove", "forced.test", "--force", "--json")
    assert done.returncode == 0, done.stderr
    assert "bounced after retry.lifetime" in section(answer(done), "queue")["text"]
    assert shim.queue_files("deferred")  # still queued, retried
    assert site_names(shim) == {"site1.test", "site2.test", "system"}


def run_hook(shim: Shim, argv: list[str], env: dict[str, str], stdin: str = ""
             ) -> subprocess.CompletedProcess[str]:
    full = dict(shim.env(), SENDMAIL_SHIM_ADMIN=ADMIN, **env)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=full,
                          timeout=180)


def cpanel_payload(event: str, stage: str, data: dict[str, Any]) -> str:
    """The JSON cPanel writes on a hook script's stdin (guide to standardized hooks)."""
    return json.dumps({"context": {"category": "Whostmgr", "event": event, "stage": stage,
                                   "point": "main"},
                       "hook": {"exectype": "script", "hook": CPANEL, "stage": stage,
                                "escalateprivs": 0, "weight": 100, "id": "x1"},
                       "data": data}) + "\n"


def test_cpanel_account_create_modify_remove(panel: tuple[Shim, Relay]) -> None:
    shim, relay = panel
    user = "shimpanel2"
    create = {"user": user, "domain": "cp.test", "homedir": f"/home/{user}",
              "homeroot": "/home", "owner": "root", "plan": "default", "pass": "x" * 12,
              "contactemail": "", "useip": "n", "uid": "", "gid": ""}
    done = run_hook(shim, [CPANEL], {}, cpanel_payload("Accounts::Create", "post", create))
    assert done.returncode == 0, done.stderr
    result = answer(done)
    assert section(result, "site")["docroots"] == [f"/home/{user}/public_html"]
    assert shim.sendmail(["-t", "-i"], MESSAGE, user=user).returncode == 0
    delivered_as(relay, user)
    again = run_hook(shim, [CPANEL], {}, cpanel_payload("Accounts::Create", "post", create))
    assert again.returncode == 0 and answer(again)["changed"] is False

    modify = {"user": user, "newuser": user, "domain": "cp.test", "newdomain": "cp2.test"}
    done = run_hook(shim, [CPANEL], {}, cpanel_payload("Accounts::Modify", "post", modify))
    assert done.returncode == 0, done.stderr
    assert section(answer(done), "site")["domains"] == ["cp2.test"]

    remove = {"user": user, "killdns": 1, "keep_remote_databases": 0}
    done = run_hook(shim, [CPANEL], {}, cpanel_payload("Accounts::Remove", "pre", remove))
    assert done.returncode == 0, done.stderr
    assert user not in site_names(shim)
    bad = run_hook(shim, [CPANEL], {}, "not json\n")
    assert bad.returncode == 65 and "not a cPanel hook payload" in bad.stderr


def test_plesk_domain_create_and_delete(panel: tuple[Shim, Relay], workdir: str) -> None:
    shim, relay = panel
    vhosts = os.path.join(workdir, "vhosts")
    user = ensure_user("shimplesk")
    subprocess.run(["usermod", "-d", os.path.join(vhosts, "pl.test"), "shimplesk"], check=True)
    env = {"NEW_DOMAIN_NAME": "pl.test", "NEW_SYSTEM_USER": "shimplesk",
           "NEW_IP_ADDRESS": "192.0.2.7", "SENDMAIL_SHIM_VHOSTS": vhosts}
    done = run_hook(shim, [PLESK, "create"], env)
    assert done.returncode == 0, done.stderr
    assert section(answer(done), "site")["docroots"] == [f"{vhosts}/pl.test/httpdocs"]
    assert shim.sendmail(["-t", "-i"], MESSAGE, user="shimplesk").returncode == 0
    delivered_as(relay, "pl.test")
    wrong = run_hook(shim, [PLESK, "create"], dict(env, NEW_DOMAIN_NAME="site1.test",
                                                   NEW_WWW_ROOT=f"{vhosts}/pl.test/x"))
    assert wrong.returncode == 73, wrong.stderr  # the name of an existing site
    done = run_hook(shim, [PLESK, "delete"], {"OLD_DOMAIN_NAME": "pl.test"})
    assert done.returncode == 0, done.stderr
    assert "pl.test" not in site_names(shim)
    assert user.pw_uid == pwd.getpwnam("shimplesk").pw_uid


def test_virtualmin_server_and_sub_server(panel: tuple[Shim, Relay]) -> None:
    shim, relay = panel
    user = "shimpanel4"
    top = {"VIRTUALSERVER_ACTION": "CREATE_DOMAIN", "VIRTUALSERVER_DOM": "vm.test",
           "VIRTUALSERVER_USER": user, "VIRTUALSERVER_HOME": f"/home/{user}",
           "VIRTUALSERVER_PUBLIC_HTML_PATH": f"/home/{user}/public_html",
           "VIRTUALSERVER_ID": "1701"}
    done = run_hook(shim, [VIRTUALMIN], top)
    assert done.returncode == 0, done.stderr
    sub = dict(top, VIRTUALSERVER_DOM="sub.vm.test", VIRTUALSERVER_PARENT="1701",
               VIRTUALSERVER_PUBLIC_HTML_PATH=f"/home/{user}/domains/sub.vm.test/public_html")
    done = run_hook(shim, [VIRTUALMIN], sub)
    assert done.returncode == 0, done.stderr
    assert {"vm.test", "sub.vm.test"} <= site_names(shim)
    # No docroot holds the caller's working directory: the first site of the uid in
    # file-name order takes the mail (fragments.py, policy/identity.py).
    assert shim.sendmail(["-t", "-i"], MESSAGE, user=user).returncode == 0
    delivered_as(relay, "sub.vm.test")
    assert run_hook(shim, [VIRTUALMIN], dict(top, VIRTUALSERVER_ACTION="SSL_DOMAIN")
                    ).returncode == 0
    for env in (sub, top):
        done = run_hook(shim, [VIRTUALMIN], dict(env, VIRTUALSERVER_ACTION="DELETE_DOMAIN"))
        assert done.returncode == 0, done.stderr
    assert not {"vm.test", "sub.vm.test"} & site_names(shim)


def test_a_failed_relay_command_is_reported_and_run_again(panel: tuple[Shim, Relay],
                                                          workdir: str) -> None:
    shim, relay = panel
    script = os.path.join(workdir, "relay-login")
    with open(script) as fh:
        working = fh.read()
    with open(script, "w") as fh:
        fh.write("#!/bin/sh\necho 'relay.example: connection refused' >&2\nexit 3\n")
    args = ("site", "add", "late.test", "--uid", "shimpanel3", "--domain", "late.test",
            "--password-stdin", "--json")
    done = admin(shim, *args, stdin="late-password-1234\n")
    assert done.returncode == 69, done.stderr
    result = answer(done)
    assert section(result, "relay") == {"section": "relay", "command": f"{script} add late.test",
                                        "ok": False, "text": "relay.example: connection refused"}
    assert section(result, "daemon")["state"] == "reloaded"  # the site is in place
    assert "late.test" in site_names(shim)
    with open(script, "w") as fh:
        fh.write(working)
    other = admin(shim, *args, stdin="another-password-1234\n")
    assert other.returncode == 73 and "another password" in other.stderr
    again = admin(shim, *args, stdin="late-password-1234\n")
    assert again.returncode == 0, again.stderr
    assert answer(again)["changed"] is False and section(answer(again), "relay")["ok"] is True
    assert shim.sendmail(["-t", "-i"], MESSAGE, user="shimpanel3").returncode == 0
    delivered_as(relay, "late.test")


def test_config_check_reviews_who_may_read_and_write_site_files(
        panel: tuple[Shim, Relay]) -> None:
    shim, _ = panel
    directory = os.path.join(shim.workdir, "sites.d")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "hand.test.yaml")
    with open(path, "w") as fh:
        fh.write("uids: [shimpanel3]\ndomains: [hand.test]\n")
    os.chmod(path, 0o600)  # an editor under umask 077
    checked = admin(shim, "config", "check")
    assert checked.returncode == 78
    assert f"{path}: the daemon's user (uid {pwd.getpwnam(DAEMON_USER).pw_uid}) cannot read" \
        in checked.stdout
    os.chmod(path, 0o664)
    checked = admin(shim, "config", "check")
    assert checked.returncode == 78 and f"{path}: writable by others" in checked.stdout
    os.chmod(path, 0o644)
    with open(os.path.join(directory, "typo.test.yml"), "w") as fh:
        fh.write("uids: [shimpanel4]\n")
    checked = admin(shim, "config", "check")
    assert checked.returncode == 0, checked.stdout
    assert "typo.test.yml: not read (only NAME.yaml is)" in checked.stdout
