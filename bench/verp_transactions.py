"""What VERP's extra SMTP transactions cost: messages per second through ``SmtpSender`` to the local sink.

Sends the same message (about the size of a one-page invoice with its notification) N times on one
session, as a night's batch does, in four ways: one recipient; two recipients in one transaction
(without mailing_bounces); two recipients in two transactions with VERP senders and DSN parameters
(with mailing_bounces); and, for scale, one SMTP round trip (NOOP). Prints one line per way.

Run: ``python bench/verp_transactions.py [--messages 2000]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import smtplib
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="verp-bench-"))  # connections come from the env

from dev.smtp_sink import SmtpSink  # noqa: E402
from include.invoice_mailing.bounces import verp_sender  # noqa: E402
from include.invoice_mailing.deliver import SmtpSender, WireMessage  # noqa: E402

RECIPIENTS = ["kari@bolgen.example", "post@bolgen.example"]
BOUNCES, KEY = "bounces@fjordlys.example", b"bench-only-key-" * 3


def sample_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Cc"] = "faktura@fjordlys.example", RECIPIENTS[0], RECIPIENTS[1]
    msg["Subject"], msg["Message-ID"] = "Invoice INV000101", "<bench@fjordlys.example>"
    msg.set_content("Dear customer,\n\nplease find your invoice attached.\n" * 20)
    msg.add_attachment(os.urandom(24_000), maintype="application", subtype="pdf", filename="INV000101.pdf")
    return msg


def timed(label: str, messages: int, send) -> None:
    started = time.perf_counter()
    for n in range(messages):
        send(n)
    seconds = time.perf_counter() - started
    print(f"{label:<44} {messages / seconds:8.0f} messages/s  {seconds / messages * 1000:6.2f} ms/message")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
    wire = WireMessage.of(sample_message(), RECIPIENTS)
    print(f"message: {len(wire.data)} bytes, {args.messages} messages a way, one session each way")
    with SmtpSink(dsn=True) as sink:
        os.environ["AIRFLOW_CONN_SMTP_DEFAULT"] = json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": sink.port,
             "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 10}})

        def verp(n: int) -> None:  # as sending.send_each does it: one transaction per delivery
            for i, rcpt in enumerate(RECIPIENTS):
                sender_address = verp_sender(BOUNCES, 2 * n + i + 1, KEY)
                assert sender.send("smtp_default", wire, sender_address, [rcpt], envid=f"{2 * n + i + 1}").accepted

        with smtplib.SMTP("127.0.0.1", sink.port) as client:
            client.ehlo()
            timed("one SMTP round trip (NOOP)", args.messages, lambda n: client.noop())
        for label, send in (
            ("1 recipient, 1 transaction", lambda n: sender.send("smtp_default", wire, "faktura@fjordlys.example",
                                                                RECIPIENTS[:1])),
            ("2 recipients, 1 transaction (no bounces)", lambda n: sender.send(
                "smtp_default", wire, "faktura@fjordlys.example", RECIPIENTS)),
            ("2 recipients, 2 transactions (VERP + DSN)", verp),
        ):
            with SmtpSender() as sender:
                timed(label, args.messages, send)
        print(f"sink kept {len(sink.received)} transactions, peak {sink.peak_sessions} session(s) at once")


if __name__ == "__main__":
    main()
