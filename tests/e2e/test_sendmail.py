"""`mailhost sendmail`: what cron, PHP and Git run."""

from __future__ import annotations


from tests.e2e.test_sending import wait_for


def sendmail(daemon, args: list[str], message: bytes, check: bool = True):
    import subprocess

    from tests.e2e.conftest import MAILHOST

    result = subprocess.run([MAILHOST, "--config", str(daemon.config), "sendmail", *args], input=message,
                            capture_output=True, timeout=30)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_sendmail_with_daemon_down_then_up(make_daemon):
    daemon = make_daemon(start=False)
    result = sendmail(daemon, ["-i", "-f", "cron@example.test", "alice@example.test"],
                      b"Subject: nightly backup\n\nall good\n.\nstill body with -i\n")
    assert result.stdout == b"" and result.stderr == b""
    assert daemon.messages("alice") == []  # safely in pickup, not yet delivered
    daemon.start()
    [msg] = wait_for(lambda: daemon.messages("alice"), what="delivery after start")
    assert msg["Subject"] == "nightly backup"
    assert msg["Return-Path"] == "<cron@example.test>"
    assert msg["Message-ID"] and msg["Date"] and msg["From"]
    assert msg.get_payload() == "all good\n.\nstill body with -i\n"


def test_sendmail_pokes_the_running_daemon_and_dot_ends_without_i(daemon):
    sendmail(daemon, ["bob@example.test"], b"Subject: quick\n\nline\n.\nnot part of it\n")
    [msg] = wait_for(lambda: daemon.messages("bob"), what="delivery")
    assert msg.get_payload() == "line\n"
    # Collected because the command told the daemon over the control socket, not by the slow scan.
    assert "pickup" in wait_for(lambda: [line for line in daemon.log().splitlines() if "control: pickup" in line],
                                what="the poke in the log")[0]


def test_sendmail_t_reads_recipients_and_removes_bcc(daemon):
    sendmail(daemon, ["-t", "-i"], (
        b"From: Reports <alice@example.test>\nTo: bob@example.test\nCc: carol@other.test\n"
        b"Bcc: alice@example.test,\n  hidden@other.test\nSubject: report\n\nnumbers\n"
    ))
    bob = wait_for(lambda: daemon.messages("bob"), what="To")
    carol = wait_for(lambda: daemon.messages("carol", "other.test"), what="Cc and the catch-all for Bcc")
    alice = wait_for(lambda: daemon.messages("alice"), what="Bcc")
    for copy in bob + carol + alice:
        assert copy["Bcc"] is None
        assert "hidden@other.test" not in copy.as_string()
    assert len(carol) == 1  # carol@ and the Bcc hidden@ (catch-all) are one mailbox


def test_sendmail_unknown_local_user_and_no_recipients_fail_with_one_line(daemon):
    for args, text in ((["nobody@example.test"], b"no such user"), ([], b"no recipients"), (["-X"], b"unsupported option")):
        result = sendmail(daemon, args, b"Subject: x\n\nx\n", check=False)
        assert result.returncode == 1
        assert text in result.stderr and result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr


def test_an_unqualified_sender_is_qualified_with_the_hostname(daemon):
    # As Postfix's sendmail does (append_at_myorigin); before: "'root' is not a valid sender address".
    sendmail(daemon, ["-f", "root", "-i", "alice@example.test"], b"Subject: from cron\n\nx\n")
    [msg] = wait_for(lambda: daemon.messages("alice"), what="delivery")
    assert msg["Return-Path"] == "<root@mail.example.test>"
    assert msg["From"] == "root@mail.example.test"


def test_an_unqualified_recipient_is_a_user_of_the_first_domain(daemon):
    # `echo report | sendmail alice` from cron: before, "'alice' is not a valid recipient address".
    sendmail(daemon, ["-i", "alice"], b"Subject: cron output\n\nx\n")
    [msg] = wait_for(lambda: daemon.messages("alice"), what="delivery")
    assert msg["Delivered-To"] == "alice@example.test"
    result = sendmail(daemon, ["-i", "nobody"], b"Subject: x\n\nx\n", check=False)
    assert result.returncode == 1 and b"nobody@example.test" in result.stderr
