"""What a hostile message in the bounce mailbox costs the reader, against a real report read in the same run.

The bounce address is in every invoice's Return-Path, so anybody can mail it. Each case is a message built
to be slow for the standard library's parser (a long header value, a long folded header, a DSN with a long
Diagnostic-Code, many MIME parts, a report with the invoice returned whole). For each, the time of
``bounces.read_report`` (the bounded reader) and, for scale, of the standard library reading the same
headers unbounded, each divided by the time of reading ``postfix-5.1.1-hard.eml`` (the baseline, a real
DSN). A ratio near 1 means a hostile message costs what a real report does.

Run: ``python bench/bounce_reader.py [--kb 200]`` (``--kb``: the size of each hostile part).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from include.invoice_mailing.bounces import read_report  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bounces" / "postfix-5.1.1-hard.eml"


def cases(kb: int) -> dict[str, bytes]:
    n = kb * 1024
    dsn = re.sub(rb"\A(#[^\n]*\n)+", b"", FIXTURE.read_bytes())
    boundary = b"--4Xk2Lz1d9Yz9sWc.1763946191/smtp.fjordlys.example"
    return {
        "long Subject": b"From: a@b.example\r\nSubject: " + b"x " * (n // 2) + b"\r\n\r\nbody\r\n",
        "long folded To": b"From: a@b.example\r\nTo: " + b"a@b.example,\r\n " * (n // 15) + b"c@d.example\r\n\r\nx\r\n",
        "long Diagnostic-Code": dsn.replace(b"Diagnostic-Code: smtp; 550", b"Diagnostic-Code: smtp; 550" + b" y" * (n // 2)),
        "many parts": b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
                      + b"--b\r\nContent-Type: text/plain\r\n\r\np\r\n" * (n // 40) + b"--b--\r\n",
        "invoice returned whole": dsn.replace(boundary + b"--", boundary + b"\nContent-Type: application/pdf\n\n"
                                              + b"JVBERi0xLjcK\n" * (4 * n // 13) + boundary + b"--"),
    }


def unbounded(raw: bytes) -> None:
    """What the reader did before issue 31: parse it all, read every header of every part."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    for part in msg.walk():
        for _, value in part.items():
            str(value)


def timed(function, raw: bytes, rounds: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        function(raw)
    return (time.perf_counter() - start) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kb", type=int, default=200, help="the size of each hostile part, in kB")
    args = parser.parse_args()
    baseline_raw = re.sub(rb"\A(#[^\n]*\n)+", b"", FIXTURE.read_bytes())
    baseline = timed(read_report, baseline_raw, rounds=200)
    print(f"baseline: read_report of a real DSN ({len(baseline_raw):,} B): {baseline * 1000:.2f} ms")
    print(f"{'case':24} {'bytes':>10} {'read_report':>12} {'ratio':>8} {'unbounded':>11} {'ratio':>8}  read as")
    for name, raw in cases(args.kb).items():
        bounded, plain = timed(read_report, raw), timed(unbounded, raw)
        print(f"{name:24} {len(raw):>10,} {bounded * 1000:>9.1f} ms {bounded / baseline:>7.1f}x "
              f"{plain:>9.2f} s {plain / baseline:>7.0f}x  {read_report(raw).kind.value}")


if __name__ == "__main__":
    main()
