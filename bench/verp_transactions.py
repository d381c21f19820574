"""What VERP's extra SMTP transactions cost: messages per second through ``SmtpSender`` to the local sink.

Sends the same message (about the size of a one-page invoice with its notification) N times on one
session, as a night's batch does, in four ways: one recipient; two recipients in one transaction
(without mailing_bounces); two recipients in two transactions with VERP senders and DSN parameters
(with mailing_bounces); and, for scale, one SMTP round trip (NOOP). Prints one line per way. The VERP
way runs twice: on a relay that offers PIPELINING (MAIL FROM and RCPT TO in one write) and on one that
does not. ``--rtt-ms`` puts a proxy between the two that delays everything by that round trip, as a
distant relay would be (the local sink answers within a tenth of a millisecond).

Run: ``python bench/verp_transactions.py [--messages 2000] [--rtt-ms 20 --messages 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import smtplib
import sys
import tempfile
import threading
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


class Latency:
    """A TCP proxy on 127.0.0.1 that delays every chunk by half ``rtt`` seconds, each way, in order."""

    def __init__(self, target_port: int, rtt: float):
        self.target_port, self.half = target_port, rtt / 2
        self.loop = asyncio.new_event_loop()
        self.port = 0

    def __enter__(self) -> Latency:
        ready = threading.Event()

        async def serve() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def cancel_all() -> None:
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _client(self, reader, writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        except (asyncio.CancelledError, ConnectionError):  # the benchmark ended, or a side hung up
            writer.close()
            upstream_writer.close()

    async def _pipe(self, reader, writer) -> None:
        loop = asyncio.get_running_loop()
        while data := await reader.read(65536):
            loop.call_at(loop.time() + self.half, writer.write, data)  # the same delay for each: order kept
        loop.call_at(loop.time() + self.half, writer.close)


def timed(label: str, messages: int, send) -> None:
    started = time.perf_counter()
    for n in range(messages):
        send(n)
    seconds = time.perf_counter() - started
    print(f"{label:<44} {messages / seconds:8.0f} messages/s  {seconds / messages * 1000:6.2f} ms/message")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="a distant relay: this round trip added")
    args = parser.parse_args()
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
    wire = WireMessage.of(sample_message(), RECIPIENTS)
    print(f"message: {len(wire.data)} bytes, {args.messages} messages a way, one session each way, "
          f"round trip {'as on this machine' if not args.rtt_ms else f'{args.rtt_ms:g} ms more'}")
    with SmtpSink(dsn=True) as sink, Latency(sink.port, args.rtt_ms / 1000) as proxy:
        port = proxy.port if args.rtt_ms else sink.port
        os.environ["AIRFLOW_CONN_SMTP_DEFAULT"] = json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": port,
             "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 10}})

        def without_pipelining(n: int) -> None:
            if n == 0:  # the relay stops offering it; the next session's EHLO says so
                sink.faults.ehlo_add.remove("PIPELINING")
            verp(n)

        def verp(n: int) -> None:  # as sending.send_each does it: one transaction per delivery
            for i, rcpt in enumerate(RECIPIENTS):
                sender_address = verp_sender(BOUNCES, 2 * n + i + 1, KEY)
                assert sender.send("smtp_default", wire, sender_address, [rcpt], envid=f"{2 * n + i + 1}").accepted

        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo()
            timed("one SMTP round trip (NOOP)", args.messages, lambda n: client.noop())
        for label, send in (
            ("1 recipient, 1 transaction", lambda n: sender.send("smtp_default", wire, "faktura@fjordlys.example",
                                                                RECIPIENTS[:1])),
            ("2 recipients, 1 transaction (no bounces)", lambda n: sender.send(
                "smtp_default", wire, "faktura@fjordlys.example", RECIPIENTS)),
            ("2 recipients, 2 transactions (VERP + DSN)", verp),
            ("the same without PIPELINING", without_pipelining),
        ):
            with SmtpSender() as sender:
                timed(label, args.messages, send)
        print(f"sink kept {len(sink.received)} transactions, peak {sink.peak_sessions} session(s) at once")


if __name__ == "__main__":
    main()
