"""Property-based fuzzing of what strangers can hand the product (issue 31): any message in the bounce mailbox,
any notification template in the ERP. Whatever the input, the reader gives a report with a kind and a reason and
the auditors' text, and a template renders within its output size or is refused, each in bounded time and memory.

In ``make test`` the examples are derandomized (the same every run, so a red CI run is reproducible) and few
enough to take about a minute; ``HYPOTHESIS_PROFILE=fuzz`` runs many more, random, for a longer hunt.
"""

from __future__ import annotations

import os
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from include.invoice_mailing.bounces import Kind, read_report, report_text
from include.invoice_mailing.render import Budget, Renderer, RenderError
from tests.test_bounce_reports import fixture
from tests.test_render import CUSTOMER, DOC, template

settings.register_profile("make-test", max_examples=150, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=5000, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "make-test")

# What one message may cost the reader, whatever it holds: a real DSN takes about 10 ms on a CI core.
READ_SECONDS, READ_PEAK_BYTES = 2.0, 64 * 1024 * 1024

FIXTURES = ["postfix-5.1.1-hard.eml", "exchange-legacy-no-verp.eml", "gmail-5.1.1-hard.eml", "qmail-hard.eml",
            "auto-reply-rfc3834.eml", "broken-mime.eml", "unknown-charset.eml", "office365-5.1.10-hard.eml"]

_header_names = st.sampled_from([b"Subject", b"To", b"From", b"Message-ID", b"Content-Type", b"Received",
                                 b"Diagnostic-Code", b"Final-Recipient", b"X-Failed-Recipients", b"Return-Path",
                                 b"Content-Transfer-Encoding", b"Auto-Submitted", b"Original-Envelope-Id"])
_values = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"=?utf-8?q?=C2=ABkari=40bolgen.example=C2=BB?=", b"=?unknown-8bit?b?////?=", b"\x00",
                     b"multipart/report; report-type=delivery-status; boundary=\"b\"", b"rfc822; a@b.example",
                     b"message/rfc822", b"base64", b"<a@b>", b"auto-replied"]),
    st.tuples(st.sampled_from([b"x ", b"a@b.example, ", b"=?utf-8?q?x?= ", b"(", b"\"", b"<"]),
              st.integers(1, 40_000)).map(lambda t: t[0] * t[1]),  # long values: the stdlib parser's weakness
)


@st.composite
def mime_trees(draw, depth: int = 0) -> bytes:
    """A MIME entity: headers (some long, some hostile), then a body or more entities under a boundary."""
    headers = draw(st.lists(st.tuples(_header_names, _values), max_size=8))
    lines = [name + b": " + value for name, value in headers]
    if depth < 3 and draw(st.booleans()):
        boundary = draw(st.sampled_from([b"b", b"b" + b"x" * 70, b"", b"--"]))
        kind = draw(st.sampled_from([b"multipart/report; report-type=delivery-status", b"multipart/mixed",
                                     b"message/rfc822", b"message/delivery-status"]))
        lines.append(b"Content-Type: " + kind + b'; boundary="' + boundary + b'"')
        parts = draw(st.lists(mime_trees(depth + 1), max_size=draw(st.sampled_from([3, 150]))))
        body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
        body += b"--" + boundary + b"--\r\n" if draw(st.booleans()) else b""
    else:
        body = draw(st.binary(max_size=500))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@st.composite
def mutated_reports(draw) -> bytes:
    """A real report, then a few cuts, insertions, repeated lines or a stretched header."""
    raw = bytearray(fixture(draw(st.sampled_from(FIXTURES))))
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["cut", "insert", "repeat", "stretch"]))
        if action == "cut":
            del raw[at:at + draw(st.integers(1, 400))]
        elif action == "insert":
            raw[at:at] = draw(st.one_of(st.binary(max_size=64), _values))
        elif action == "repeat":
            start = raw.rfind(b"\n", 0, at) + 1
            end = raw.find(b"\n", at)
            line = bytes(raw[start:end + 1 if end >= 0 else len(raw)])
            raw[start:start] = line * draw(st.integers(1, 3000))
        else:
            raw[at:at] = b" x" * draw(st.integers(1000, 150_000))
    return bytes(raw)


def _bounded(function, raw: bytes):
    tracemalloc.start()
    try:
        started = time.perf_counter()
        result = function(raw)
        took = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert took < READ_SECONDS, f"{took:.2f} s for {len(raw):,} bytes"
    assert peak < READ_PEAK_BYTES, f"{peak:,} bytes allocated for {len(raw):,} bytes"
    return result


@settings(settings.get_profile(PROFILE))
@given(st.one_of(st.binary(max_size=4096), mime_trees(), mutated_reports()))
def test_any_message_in_the_bounce_mailbox_is_read_in_bounded_time_and_memory(raw):
    report = _bounded(read_report, raw)
    assert isinstance(report.kind, Kind) and report.reason
    assert all(isinstance(address, str) and "\x00" not in address for address in report.addressed_to)
    assert isinstance(_bounded(report_text, raw), str)


# --- The template sandbox ---------------------------------------------------------------------------------

BUDGET = Budget(seconds=0.5, max_bytes=200_000)
_atoms = st.sampled_from(["s", "s", "'x'", "'x' * 5000", "document.number", "company.address", "range(1000)", "'ø'",
                          "('x' * 1000).encode()", "[1, 2, 3]", "10 ** 40", "company"])
_filters = st.sampled_from(["|list", "|join", "|center(100000)", "|replace('x', 'yy')", "|forceescape",
                            "|map('upper')|list", "|reverse", "|string", "|tojson", "|wordwrap(2)", "|indent(50)",
                            "|batch(300)|list", "|length", "|e"])
_methods = st.sampled_from([".ljust(90000)", ".encode('utf-32')", ".decode('latin-1')", ".hex()", ".upper()",
                            ".center(50000)", ".replace('x', 'xxxx')", ".zfill(100000)", ".split()"])
_binops = st.sampled_from([" * 40", " * 40000", " + 'x' * 9000", " ~ 'y'", " ** 60", " % 1"])


_iterables = st.sampled_from(["s", "s|list", "s|reverse", "s if i", "range(100000)", "s.split('x')"])


@st.composite
def expressions(draw, depth: int = 0) -> str:
    expression = draw(_atoms)
    for _ in range(draw(st.integers(0, 4))):
        expression = f"({expression}){draw(st.one_of(_filters, _methods, _binops))}"
    if depth < 2 and draw(st.booleans()):
        inner = draw(expressions(depth + 1))
        expression = draw(st.sampled_from([f"{expression} ~ {inner}", f"[{expression}, {inner}]"]))
    return expression


@st.composite
def templates(draw, depth: int = 0) -> str:
    body = []
    for _ in range(draw(st.integers(1, 3 if depth == 0 else 2))):
        # Weighted towards loops of quiet steps: what no attribute, call or output would check the clock on.
        shapes = ["print", "set", "quiet", "quiet", "quiet"] + (["loop"] * 3 if depth < 2 else [])
        shape = draw(st.sampled_from(shapes))
        if shape == "quiet":  # a step that reads no attribute, calls nothing and writes nothing
            body.append(draw(st.sampled_from(["", "{% set v = i %}", "{% if i == 'y' %}y{% endif %}"])))
        elif shape == "print":
            body.append("{{ " + draw(expressions()) + " }}")
        elif shape == "set":
            body.append("{% set v = " + draw(expressions()) + " %}{{ v }}")
        else:
            over = draw(st.one_of(_iterables, expressions()))
            body.append("{% for i in " + over + " %}" + draw(templates(depth + 1)) + "{% endfor %}")
    return "".join(body)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    warm = Renderer(notification_budget=BUDGET)
    warm.notification(template("<p>{{ document.number }}</p>"), DOC, CUSTOMER, {"address": "a@b.no"}, "nb_NO")
    return warm


@settings(settings.get_profile(PROFILE), max_examples=min(settings.get_profile(PROFILE).max_examples, 120))
@given(body=templates())
def test_any_template_renders_within_its_budget_or_is_refused(renderer, body):
    """The budget (0.5 s, 200 kB here) holds for every template: it renders no more than it may, or it is a
    RenderError; either way within the time budget and a few times the output's size in memory."""
    body = "{% set s = 'x' * 20000 %}" + body  # a long string: a loop over it must still check the clock
    tracemalloc.start()
    started = time.perf_counter()
    try:
        note = renderer.notification(template(f"<p>{body}</p>"), DOC, CUSTOMER, {"address": "a@b.no"}, "nb_NO")
    except RenderError:
        note = None
    finally:
        took = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if note is not None:
        assert len(note.html) <= BUDGET.max_bytes + 100
    assert took < BUDGET.seconds + 1.5, f"{took:.2f} s: {body}"
    assert peak < 40 * BUDGET.max_bytes, f"{peak:,} bytes: {body}"
