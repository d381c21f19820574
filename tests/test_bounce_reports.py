"""Spec section 9, bounce reports: VERP tokens and what one message of the bounce mailbox says (no servers)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from include.invoice_mailing.bounces import (
    BOUNCE_KEY_VARIABLE,
    MAX_REPORT_BYTES,
    BounceKeyError,
    Kind,
    bounce_key_from_environment,
    delivery_of,
    read_report,
    verp_sender,
)

FIXTURES = Path(__file__).parent / "fixtures" / "bounces"
# The VERP addresses in the fixtures were made with this key and bounce address.
KEY = b"fixture-key-for-bounce-tests-only"
BOUNCE_ADDRESS = "bounces@fjordlys.example"


def fixture(name: str) -> bytes:
    """A fixture's bytes without the '#' lines at its top that say where its format comes from."""
    return re.sub(rb"\A(#[^\n]*\n)+", b"", (FIXTURES / name).read_bytes())


# name, kind, status, failed recipient, delivery id (by VERP), original Message-ID
EXPECTED = [
    ("postfix-5.1.1-hard.eml", Kind.HARD, "5.1.1", "ap@nordvik-bygg.example", 101,
     "<10042.pdf.3f1c2a9be07d4c6a81b2e5f0@fjordlys.example>"),
    ("postfix-5.7.1-blocked.eml", Kind.BLOCKED, "5.7.1", "okonomi@vestby-transport.example", 102,
     "<10043.pdf.9d2e41c07a6b5f3e28c1d0a4@fjordlys.example>"),
    # Written by Postfix itself (3.7, dev/postfix.py), not by hand.
    ("postfix-captured-5.1.1.eml", Kind.HARD, "5.1.1", "okonomi@fjellheim-bakeri.example", 115,
     "<10075.pdf.6c5d4e3f2a1b0c9d8e7f6a5b@fjordlys.example>"),
    ("postfix-4.4.1-delayed.eml", Kind.DELAYED, "4.4.1", "regnskap@kvamme-el.example", 103,
     "<10044.pdf.51be0c7d93a2e4f6b8d1c2a0@fjordlys.example>"),
    # Exim's Status says 5.0.0 although the remote said 5.1.1: the Status field is the report's word.
    ("exim-5.1.1-hard.eml", Kind.HARD, "5.0.0", "post@lindqvist-ror.example", 104,
     "<10045.pdf.c4d3e2f1a0b9c8d7e6f5a4b3@fjordlys.example>"),
    ("qmail-hard.eml", Kind.HARD, "5.1.1", "faktura@haugland-agentur.example", 105,
     "<10046.pdf.0a1b2c3d4e5f60718293a4b5@fjordlys.example>"),
    ("office365-5.1.10-hard.eml", Kind.HARD, "5.1.10", "okonomi@strand-maritim.example", 106,
     "<10047.pdf.7e6d5c4b3a2918070f1e2d3c@fjordlys.example>"),
    ("gmail-5.1.1-hard.eml", Kind.HARD, "5.1.1", "regnskap@solberg-fisk.example", 107,
     "<10048.pdf.1f2e3d4c5b6a798897a6b5c4@fjordlys.example>"),
    ("sendmail-5.1.1-hard.eml", Kind.HARD, "5.1.1", "innkjop@berg-vvs.example", 108,
     "<10049.pdf.a0b1c2d3e4f5061728394a5b@fjordlys.example>"),
    # No VERP address left: only the original Message-ID and the recipient name the delivery.
    ("exchange-legacy-no-verp.eml", Kind.HARD, None, "innkjop@kystnett.example", None,
     "<10061.pdf.5a4b3c2d1e0f9a8b7c6d5e4f@fjordlys.example>"),
    # Yahoo's and GroupWise's own formats: flufl.bounce's detectors name the address, no status code.
    ("yahoo-hard.eml", Kind.HARD, None, "lars.nyheim@yahoo.com", 116,
     "<10076.pdf.8a7b6c5d4e3f201918273645@fjordlys.example>"),
    ("groupwise-hard.eml", Kind.HARD, None, "faktura@kommune-nordby.example", 117,
     "<10077.pdf.4c3b2a1908f7e6d5c4b3a291@fjordlys.example>"),
    ("unknown-charset.eml", Kind.HARD, "5.1.1", "ordre@bakke-verksted.example", 114,
     "<10074.pdf.2b3c4d5e6f708192a3b4c5d6@fjordlys.example>"),
]

NOT_BOUNCES = [
    ("auto-reply-rfc3834.eml", Kind.AUTO_REPLY, "Auto-Submitted: auto-replied"),
    ("out-of-office-no-header.eml", Kind.AUTO_REPLY, "Automatisk svar"),
    ("person-reply.eml", Kind.OTHER, "neither a bounce nor an automatic reply"),
    ("broken-mime.eml", Kind.UNREADABLE, "broken MIME structure"),
]


def test_every_fixture_says_which_mta_it_represents():
    names = sorted(path.name for path in FIXTURES.glob("*.eml"))
    assert names == sorted([row[0] for row in EXPECTED] + [row[0] for row in NOT_BOUNCES])
    for name in names:
        assert (FIXTURES / name).read_bytes().startswith(b"# "), name


@pytest.mark.parametrize(("name", "kind", "status", "recipient", "delivery_id", "original_message_id"), EXPECTED,
                         ids=[row[0] for row in EXPECTED])
def test_bounce_report_gives_kind_status_recipient_and_delivery(name, kind, status, recipient, delivery_id,
                                                                 original_message_id):
    report = read_report(fixture(name))

    assert report.kind is kind, report.reason
    assert report.is_bounce
    [failed] = report.recipients
    assert (failed.recipient, failed.status, failed.kind) == (recipient, status, kind)
    assert failed.diagnostic, "the remote server's words are kept for the ledger's detail"
    assert report.delivery_id(BOUNCE_ADDRESS, KEY) == delivery_id
    assert report.original_message_id == original_message_id


def test_dsn_diagnostic_is_unfolded_without_its_type():
    report = read_report(fixture("postfix-5.1.1-hard.eml"))

    assert report.recipients[0].diagnostic == (
        "550 5.1.1 <ap@nordvik-bygg.example>: Recipient address rejected: User unknown in virtual mailbox table")
    assert report.recipients[0].action == "failed"
    assert report.envelope_id == "101"
    assert "ap@nordvik-bygg.example failed 5.1.1" in report.reason


def test_non_dsn_bounce_keeps_the_paragraph_on_the_recipient_as_diagnostic():
    report = read_report(fixture("qmail-hard.eml"))

    assert report.recipients[0].diagnostic == (
        "<faktura@haugland-agentur.example>: Sorry, no mailbox here by that name. (#5.1.1)")
    assert report.reason.startswith("non-standard bounce")


def test_unknown_charset_is_read_with_replacements_and_said_in_the_reason():
    report = read_report(fixture("unknown-charset.eml"))

    assert "x-fjordlys-legacy" in report.reason
    assert "Mottakeren finnes ikke" in report.recipients[0].diagnostic


@pytest.mark.parametrize(("name", "kind", "reason"), NOT_BOUNCES, ids=[row[0] for row in NOT_BOUNCES])
def test_auto_replies_answers_and_broken_reports_are_no_bounce(name, kind, reason):
    report = read_report(fixture(name))

    assert report.kind is kind
    assert not report.is_bounce
    assert report.recipients == ()
    assert reason in report.reason


def test_rfc3834_auto_reply_to_a_verp_address_still_is_no_bounce():
    """A vacation reply goes to the envelope sender: it names the delivery, and must still not be applied."""
    report = read_report(fixture("auto-reply-rfc3834.eml"))

    assert report.delivery_id(BOUNCE_ADDRESS, KEY) == 110
    assert report.kind is Kind.AUTO_REPLY


def _message(subject: str, sender: str = "Lise Aasen <lise@aasen-regnskap.example>", headers: str = "") -> bytes:
    return (f"From: {sender}\nTo: {BOUNCE_ADDRESS}\nSubject: {subject}\n{headers}"
            "Content-Type: text/plain; charset=utf-8\n\nHei.\n").encode()


@pytest.mark.parametrize("subject", [
    "Out of Office: Faktura 10071", "Automatic reply: Faktura 10071", "Fraværsmelding", "Automatiskt svar: Faktura",
    "Abwesenheitsnotiz: Rechnung 10071", "Poissaolo: Lasku 10071",
])
def test_out_of_office_subjects_in_the_customers_languages_are_auto_replies(subject):
    assert read_report(_message(subject)).kind is Kind.AUTO_REPLY


@pytest.mark.parametrize(("headers", "kind"), [
    ("Auto-Submitted: auto-generated\n", Kind.AUTO_REPLY),
    ("Auto-Submitted: no\n", Kind.OTHER),
    ("X-Autoreply: yes\n", Kind.AUTO_REPLY),
    ("Precedence: auto_reply\n", Kind.AUTO_REPLY),
    ("Precedence: bulk\n", Kind.OTHER),
])
def test_auto_reply_headers(headers, kind):
    assert read_report(_message("Re: Faktura 10072", headers=headers)).kind is kind


def test_delay_warning_from_the_mail_system_without_dsn_is_delayed():
    report = read_report(_message("Warning: could not send message for past 4 hours",
                                  sender="Mail Delivery Subsystem <MAILER-DAEMON@mail.kvamme-el.example>"))

    assert report.kind is Kind.DELAYED


def test_a_person_writing_delayed_is_no_delay_warning():
    assert read_report(_message("Re: Faktura 10072 - delivery delayed")).kind is Kind.OTHER


# --- VERP ---------------------------------------------------------------------------------------------


def test_verp_sender_is_a_lower_case_valid_local_part_that_names_the_delivery():
    address = verp_sender(BOUNCE_ADDRESS, 4711, KEY)

    local, domain = address.split("@")
    assert domain == "fjordlys.example"
    assert re.fullmatch(r"bounces\+4711-[a-z2-7]{16}", local)
    assert delivery_of(address, BOUNCE_ADDRESS, KEY) == 4711
    assert delivery_of(f"Mail Delivery <{address}>", BOUNCE_ADDRESS, KEY) == 4711


def test_case_folded_verp_address_still_matches():
    address = verp_sender(BOUNCE_ADDRESS, 4711, KEY)

    assert delivery_of(address.upper(), BOUNCE_ADDRESS, KEY) == 4711
    assert delivery_of(address, BOUNCE_ADDRESS.upper(), KEY) == 4711


def test_forged_token_of_the_right_shape_gives_no_delivery():
    address = verp_sender(BOUNCE_ADDRESS, 4711, KEY)
    mac = address.split("-")[1].split("@")[0]
    forged_mac = ("b" if mac[0] == "a" else "a") + mac[1:]

    assert delivery_of(address.replace(mac, forged_mac), BOUNCE_ADDRESS, KEY) is None
    # Another delivery's id with this delivery's MAC.
    assert delivery_of(address.replace("+4711-", "+4712-"), BOUNCE_ADDRESS, KEY) is None
    # A token made with another deployment's key.
    assert delivery_of(verp_sender(BOUNCE_ADDRESS, 4711, b"another-deployment-key-32-bytes!!"), BOUNCE_ADDRESS,
                       KEY) is None


@pytest.mark.parametrize("address", [
    BOUNCE_ADDRESS, "faktura@fjordlys.example", "bounces+4711@fjordlys.example", "bounces+4711-@fjordlys.example",
    "bounces+0-aaaaaaaaaaaaaaaa@fjordlys.example", "", "<>", "not an address",
])
def test_addresses_that_are_not_ours_give_no_delivery(address):
    assert delivery_of(address, BOUNCE_ADDRESS, KEY) is None


def test_verp_address_of_another_bounce_mailbox_gives_no_delivery():
    address = verp_sender("bounces@other.example", 4711, KEY)

    assert delivery_of(address, BOUNCE_ADDRESS, KEY) is None
    assert delivery_of(verp_sender("returns@fjordlys.example", 4711, KEY), BOUNCE_ADDRESS, KEY) is None


def test_report_with_forged_verp_address_names_no_delivery():
    raw = fixture("postfix-5.1.1-hard.eml").replace(b"yqwuy5dschtzxjcm", b"yqwuy5dschtzxjcn")

    report = read_report(raw)

    assert report.kind is Kind.HARD
    assert report.delivery_id(BOUNCE_ADDRESS, KEY) is None


def test_bounce_key_comes_from_the_environment_and_a_short_one_is_refused():
    good = "k" * 43
    assert bounce_key_from_environment({BOUNCE_KEY_VARIABLE: good}) == good.encode()
    with pytest.raises(BounceKeyError, match=f"{BOUNCE_KEY_VARIABLE} is not set"):
        bounce_key_from_environment({})
    with pytest.raises(BounceKeyError, match="is 9 bytes long; at least 32"):
        bounce_key_from_environment({BOUNCE_KEY_VARIABLE: "too-short"})
    with pytest.raises(BounceKeyError):
        verp_sender(BOUNCE_ADDRESS, 1, b"too-short")


# --- Bad input ----------------------------------------------------------------------------------------


def test_report_above_the_size_limit_is_not_read():
    report = read_report(b"From: x@example.org\n\n" + b"x" * (20 * 1024 * 1024))

    assert report.kind is Kind.UNREADABLE
    assert "above the limit" in report.reason
    assert read_report(fixture("postfix-5.1.1-hard.eml") + b"\n" * (MAX_REPORT_BYTES + 1)).kind is Kind.UNREADABLE


@pytest.mark.parametrize("raw", [
    b"", b"\x00\xff\xfe\x80garbage\r\n\r\n", random.Random(16).randbytes(4096), b"just text, no header lines\n",
    b"Subject: x\nContent-Type: multipart/report; boundary=\"a\"\n\nno parts at all\n",
    b"Subject: =?x-none?b?!!!?=\nContent-Type: message/delivery-status\n\nAction: failed\n",
], ids=["empty", "garbage", "random", "text", "multipart-without-parts", "delivery-status-without-blocks"])
def test_garbage_gives_a_report_with_a_reason(raw):
    report = read_report(raw)

    assert report.kind in (Kind.UNREADABLE, Kind.OTHER)
    assert report.reason


def test_damaged_reports_never_raise():
    """Every fixture truncated and with bytes flipped: read_report answers each with a Report."""
    rng = random.Random(3464)
    for path in sorted(FIXTURES.glob("*.eml")):
        raw = fixture(path.name)
        for _ in range(20):
            damaged = bytearray(raw[: rng.randrange(len(raw))])
            for _ in range(rng.randrange(1, 20)):
                if damaged:
                    damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            report = read_report(bytes(damaged))
            assert report.reason, path.name


def _dsn_with_diagnostic(diagnostic: bytes) -> bytes:
    return (b"From: MAILER-DAEMON@mx.bolgen.example\r\nTo: bounces@fjordlys.example\r\nSubject: Undelivered\r\n"
            b"MIME-Version: 1.0\r\n"
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n"
            b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.bolgen.example\r\n\r\n"
            b"Final-Recipient: rfc822; kari@bolgen.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            b"Diagnostic-Code: smtp; " + diagnostic + b"\r\n--b--\r\n")


@pytest.mark.parametrize("diagnostic", [
    "550 5.1.1 «kari@bolgen.example»: ukjent mottaker".encode(),  # 8-bit: str(block) wrote it back encoded
    b"550 5.1.1 =?utf-8?q?=C2=ABkari=40bolgen=2Eexample=C2=BB?=: ukjent mottaker",  # an encoded word as sent
], ids=["8-bit", "encoded-word"])
def test_a_viewer_reads_the_report_text_with_every_address_masked_however_it_was_encoded(diagnostic):
    """Issue 31, finding 8: the auditors' text of a report is masked for viewers, but its delivery-status fields
    were written back with RFC 2047 encoded words (``=?unknown-8bit?q?=C2=ABkari=40bol...?=``), where the masker
    saw no address. The fields are decoded first, then masked."""
    from include.invoice_mailing.bounces import report_text
    from include.invoice_mailing.masking import mask_text

    text = report_text(_dsn_with_diagnostic(diagnostic))
    assert "Diagnostic-Code: smtp; 550 5.1.1 «kari@bolgen.example»: ukjent mottaker" in text
    shown = mask_text(text)
    assert "kari" not in shown and "=?" not in shown
    assert "Final-Recipient: rfc822; k***@bolgen.example" in shown and "«***@bolgen.example»" in shown


# --- Costly input (issue 31, finding 3) -----------------------------------------------------------------


def test_a_header_section_above_64_kb_is_not_read():
    raw = b"From: MAILER-DAEMON@x.example\r\n" + b"X-Pad: " + b"a@b.example, " * 6000 + b"\r\n\r\nbody\r\n"
    report = read_report(raw)
    assert report.kind is Kind.UNREADABLE
    header = raw.index(b"\r\n\r\n")
    assert report.reason == f"not read: its header section is {header:,} bytes, above the limit of 65,536"


def test_a_message_of_more_than_100_mime_parts_is_not_read():
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n" for _ in range(120))
    raw = b'From: x@y.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    report = read_report(raw)
    assert (report.kind, report.reason) == (Kind.UNREADABLE, "not read: 121 MIME parts, above the limit of 100")


def test_a_long_header_value_is_read_from_its_first_2048_characters():
    """The standard library's header parser takes worse than quadratic time in a value's length: a 200 kB
    Diagnostic-Code took 12 s to read. A value is read from its first 2,048 characters (the ledger keeps 2,000)."""
    raw = fixture("postfix-5.1.1-hard.eml").replace(b"Diagnostic-Code: smtp; 550",
                                                    b"Diagnostic-Code: smtp; 550" + b" pad" * 50_000)
    report = read_report(raw)
    [failed] = report.recipients
    assert report.kind is Kind.HARD and failed.recipient == "ap@nordvik-bygg.example"
    assert failed.diagnostic.startswith("550 pad pad") and len(failed.diagnostic) < 2048


def test_a_message_cut_after_256_kb_is_read_and_says_so():
    """What the mailbox fetches of a larger message: its first 256 kB; the cut MIME tree is no defect."""
    raw = fixture("postfix-5.1.1-hard.eml")
    last = raw.rindex(b"--4Xk2Lz1d9Yz9sWc")
    raw = raw[:last] + b"--4Xk2Lz1d9Yz9sWc.1763946191/smtp.fjordlys.example\nContent-Type: application/pdf\n\n" + (
        b"JVBERi0xLjcK" * 50_000)
    report = read_report(raw[:256 * 1024], size=len(raw))
    assert report.kind is Kind.HARD and report.delivery_id(BOUNCE_ADDRESS, KEY) == 101
    assert report.reason.endswith(f"; read from its first 262,144 of {len(raw):,} bytes")
