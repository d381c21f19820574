"""Spec section 9, the bounce mailbox: reports are read as exact bytes and never marked read; an applied
one moves alone to the processed folder; a mailbox that cannot be read says why in one line.
Against a real IMAP server (Dovecot, dev/dovecot.py)."""

from __future__ import annotations

import json
import logging

import pytest

from dev.smtp_sink import free_port
from include.invoice_mailing.bounce_mailbox import BounceMailbox, MailboxUnavailable, mailbox_settings
from tests.conftest import start_dovecot

# A DSN-like report, with CRLF line ends (as IMAP serves them) and a Latin-1 byte that is not UTF-8.
REPORT = (b"From: MAILER-DAEMON@relay.example\r\nTo: bounces+d42.mac@invoices.example\r\n"
          b"Subject: Undelivered Mail Returned to Sender\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
          b"\r\n<ola@fjellheimen.example>: host mx said: 550 5.1.1 unknown user \xd8ystein\r\n")
REPLY = b"From: ola@fjellheimen.example\r\nSubject: Re: Invoice INV010002\r\n\r\nThanks, paid.\r\n"
LATE_REPORT = b"From: MAILER-DAEMON@relay.example\r\nSubject: Delayed Mail\r\n\r\n4.4.1 still trying\r\n"

# Dovecot 2.3's capabilities after the login, without MOVE: a server older than RFC 6851.
WITHOUT_MOVE = ("IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT UNSELECT CHILDREN NAMESPACE UIDPLUS "
                "LIST-EXTENDED I18NLEVEL=1 LITERAL+")


def use_mailbox(monkeypatch, server, login: str, **extra) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(server.connection(login, **extra)))


@pytest.fixture
def login(dovecot, monkeypatch) -> str:
    """A fresh mailbox on the module's Dovecot, as the connection mailing_bounces."""
    name = dovecot.new_login()
    use_mailbox(monkeypatch, dovecot, name)
    return name


@pytest.fixture(scope="module")
def dovecot_without_move():
    server = start_dovecot(capabilities=WITHOUT_MOVE)
    yield server
    server.stop()


def read_all(**kwargs) -> list:
    with BounceMailbox.from_connection(**kwargs) as mailbox:
        return list(mailbox.messages())


def test_messages_are_read_with_their_exact_bytes_in_uid_order(dovecot, login):
    for raw in (REPORT, REPLY):
        dovecot.append(login, raw)

    messages = read_all()

    assert [m.raw for m in messages] == [REPORT, REPLY]
    assert [m.size for m in messages] == [len(REPORT), len(REPLY)]
    assert messages[0].uid < messages[1].uid


def test_reading_marks_nothing_read(dovecot, login):
    dovecot.append(login, REPORT)
    dovecot.append(login, REPLY, flags=r"\Seen")  # someone read this one already: it stays read

    read_all()
    read_all()

    assert [flags for _, flags in dovecot.messages(login)] == [set(), {r"\Seen"}]


def test_an_empty_folder_yields_nothing_and_creates_no_folder(dovecot, login):
    assert read_all() == []
    assert dovecot.folders(login) == ["INBOX"]


def test_processed_moves_exactly_that_message_with_move(dovecot, login):
    for raw in (REPORT, REPLY, LATE_REPORT):
        dovecot.append(login, raw)

    with BounceMailbox.from_connection() as mailbox:
        assert "MOVE" in mailbox.capabilities
        report, _, _ = mailbox.messages()
        mailbox.processed(report.uid)

    assert dovecot.messages(login, "INBOX") == [(REPLY, set()), (LATE_REPORT, set())]
    assert dovecot.messages(login, "Processed") == [(REPORT, set())]


def test_processed_without_move_copies_then_expunges_that_uid_only(dovecot_without_move, monkeypatch):
    server = dovecot_without_move
    login = server.new_login()
    use_mailbox(monkeypatch, server, login)
    server.append(login, REPLY)
    server.append(login, REPORT)
    # A message another mail program flagged for deletion but did not expunge: a plain EXPUNGE would take it.
    server.append(login, LATE_REPORT, flags=r"\Deleted")

    with BounceMailbox.from_connection() as mailbox:
        assert "MOVE" not in mailbox.capabilities
        _, report, _ = mailbox.messages()
        mailbox.processed(report.uid)

    assert dovecot_without_move.messages(login, "INBOX") == [(REPLY, set()), (LATE_REPORT, {r"\Deleted"})]
    assert dovecot_without_move.messages(login, "Processed") == [(REPORT, set())]


def test_the_processed_folder_is_created_when_missing_then_reused(dovecot, login, monkeypatch):
    use_mailbox(monkeypatch, dovecot, login, processed_folder="Bounces applied")  # a name with a space
    for raw in (REPORT, LATE_REPORT):
        dovecot.append(login, raw)

    with BounceMailbox.from_connection() as mailbox:
        first, _ = mailbox.messages()
        mailbox.processed(first.uid)
    assert sorted(dovecot.folders(login)) == ["Bounces applied", "INBOX"]
    with BounceMailbox.from_connection() as mailbox:
        (second,) = mailbox.messages()
        mailbox.processed(second.uid)

    assert dovecot.messages(login, "Bounces applied") == [(REPORT, set()), (LATE_REPORT, set())]
    assert dovecot.messages(login, "INBOX") == []


def test_a_message_above_the_size_limit_is_skipped_and_left_unread(dovecot, login, caplog):
    big = REPORT + b"x" * 5000 + b"\r\n"
    for raw in (big, REPLY):
        dovecot.append(login, raw)

    with caplog.at_level(logging.WARNING, logger="include.invoice_mailing.bounce_mailbox"):
        messages = read_all(size_limit=4000)

    assert [m.raw for m in messages] == [REPLY]
    assert f"is {len(big)} bytes, above the limit of 4000: left there, unread" in caplog.text
    assert dovecot.messages(login) == [(big, set()), (REPLY, set())]


def test_a_server_that_is_down_raises_mailbox_unavailable(monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(
        {"conn_type": "imap", "host": "127.0.0.1", "port": port, "login": "bounces", "password": "secret",
         "extra": {"use_ssl": False}}))

    with pytest.raises(MailboxUnavailable) as error:
        read_all()

    assert str(error.value) == (f"bounce mailbox mailing_bounces (bounces@127.0.0.1:{port}): cannot connect: "
                                "[Errno 111] Connection refused")


def test_a_refused_login_raises_mailbox_unavailable(dovecot, login, monkeypatch):
    wrong = dovecot.connection(login) | {"password": "not-the-secret"}
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(wrong))

    with pytest.raises(MailboxUnavailable) as error:
        read_all()

    assert str(error.value) == (f"bounce mailbox mailing_bounces ({login}@127.0.0.1:{dovecot.port}): "
                                "the server refused the login: [AUTHENTICATIONFAILED] Authentication failed.")


def test_a_missing_folder_raises_mailbox_unavailable(dovecot, login, monkeypatch):
    use_mailbox(monkeypatch, dovecot, login, folder="Bounces")

    with pytest.raises(MailboxUnavailable) as error:
        read_all()

    assert str(error.value).startswith(f"bounce mailbox mailing_bounces ({login}@127.0.0.1:{dovecot.port}): "
                                       "folder 'Bounces' cannot be opened: Mailbox doesn't exist: Bounces")


def test_a_missing_connection_raises_mailbox_unavailable_and_has_no_settings(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MAILING_BOUNCES", raising=False)

    with pytest.raises(MailboxUnavailable, match="Airflow has no connection 'mailing_bounces'"):
        read_all()
    assert mailbox_settings() is None


def test_settings_default_to_the_login_inbox_and_processed(dovecot, login, monkeypatch):
    assert (mailbox_settings().address, mailbox_settings().folder, mailbox_settings().processed_folder) == (
        login, "INBOX", "Processed")
    use_mailbox(monkeypatch, dovecot, login, address="bounces@invoices.example", folder="Reports",
                processed_folder="Reports/Done")
    assert (mailbox_settings().address, mailbox_settings().folder, mailbox_settings().processed_folder) == (
        "bounces@invoices.example", "Reports", "Reports/Done")


def test_a_password_outside_ascii_logs_in_and_a_wrong_one_is_refused_without_showing_it(monkeypatch):
    """imaplib's LOGIN carries ASCII only: a password such as "blåbær" raised UnicodeEncodeError past the
    MailboxUnavailable handling (collect_bounces failed the night), naming one of its characters and its place.
    It is sent as UTF-8 through AUTHENTICATE PLAIN; a wrong one is the server's refusal, in words of its own."""
    server = start_dovecot(password="blåbær-2026")
    try:
        name = server.new_login()
        server.append(name, REPLY)
        use_mailbox(monkeypatch, server, name)
        assert [m.raw for m in read_all()] == [REPLY]

        monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(
            server.connection(name) | {"password": "blåbær-2025"}))
        with pytest.raises(MailboxUnavailable) as error:
            read_all()
        said = str(error.value)
        assert said == (f"bounce mailbox mailing_bounces ({name}@127.0.0.1:{server.port}): the server refused "
                        "the login: [AUTHENTICATIONFAILED] Authentication failed."), said
        assert "å" not in said and "position" not in said
    finally:
        server.stop()
