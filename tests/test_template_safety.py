"""What a template may not do: change anything outside its own render (the seller block of a later
invoice), or build a value larger than its output may be. Each attempt is that document's config error,
named after its template, and the batch goes on."""

from __future__ import annotations

import io
import re
import shutil
import tracemalloc

import pytest
from pypdf import PdfReader

from include.invoice_mailing.render import TEMPLATES_DIR, Budget, Renderer, RenderError
from tests.test_quirks import Night, customer_with_template
from tests.test_render import CUSTOMER, DOC, template

ATTACK = "{{ company.address.clear() }}{{ company.address.append('PAY TO IBAN XX00 ATTACKER') }}"
SENDER = {"address": "a@b.no", "name": ""}


def pdf_text(pdf: bytes) -> str:
    return "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def assert_real_seller(text: str) -> None:
    assert "Strandgata 12" in text and "5013 Bergen" in text
    assert "ATTACKER" not in text


def test_a_notification_template_cannot_rewrite_the_seller_block_of_later_invoices():
    renderer = Renderer()
    with pytest.raises(RenderError, match="notification template 'InvoiceNotification'"):
        renderer.notification(template(ATTACK), DOC, CUSTOMER, SENDER, "nb_NO")

    assert_real_seller(pdf_text(renderer.attachment(DOC, CUSTOMER, None, "invoice", "PDF", "nb_NO").content))
    assert_real_seller(renderer.attachment(DOC, CUSTOMER, None, "invoice", "HTML", "nb_NO").content.decode())
    note = renderer.notification(template("<p>{{ company.address|join(', ') }}</p>"), DOC, CUSTOMER, SENDER, "nb_NO")
    assert note.text.strip() == "Strandgata 12, 5013 Bergen, Norway"


@pytest.mark.parametrize("attack", [
    ATTACK,
    "{% set _ = company.address.append('PAY TO IBAN XX00 ATTACKER') %}",
    "{{ company.update(name='ATTACKER') }}",
    "{{ company.address.__setitem__(0, 'PAY TO IBAN XX00 ATTACKER') }}",
])
def test_a_report_template_cannot_change_the_values_later_documents_see(tmp_path, attack):
    shutil.copytree(TEMPLATES_DIR, tmp_path, dirs_exist_ok=True)
    (tmp_path / "reports" / "attack.html.j2").write_text(f"<p>{attack}</p>")
    shutil.copy(tmp_path / "reports" / "invoice.css", tmp_path / "reports" / "attack.css")
    renderer = Renderer(templates_dir=tmp_path)

    with pytest.raises(RenderError, match="report template 'attack' \\(nb_NO\\)"):
        renderer.attachment(DOC, CUSTOMER, None, "attack", "HTML", "nb_NO")

    invoice = renderer.attachment(DOC, CUSTOMER, None, "invoice", "PDF", "nb_NO")
    assert_real_seller(pdf_text(invoice.content))
    assert "Fjordlys Handel AS" in pdf_text(invoice.content)


# Each builds megabytes (or gigabytes) if it is allowed to run; the budget is 1 MB.
BUILDERS = [
    ("{{ (['x' * 900000] * 20)|join }}", 18_000_000),
    ("{{ '%09000000d' % 1 }}", 9_000_000),
    ("{{ '%*d' % (9000000, 1) }}", 9_000_000),
    ("{{ '%s%s%s' % (document.number * 90000, document.number * 90000, document.number * 90000) }}", 2_430_000),
    ("{{ 'x'|center(5000000) }}", 5_000_000),
    ("{{ 'x'.rjust(5000000) }}", 5_000_000),
    ("{{ '{:>9000000}'.format(1) }}", 9_000_000),
    ("{{ '{:>{}}'.format(1, 9000000) }}", 9_000_000),
    ("{{ '%09000000d'|format(1) }}", 9_000_000),
    ("{{ [1] * 10**8 }}", 800_000_000),
    ("{{ ['x' * 1000] * 5000 }}", 5_000_000),
    ("{{ (range(100000)|list) * 10 }}", 8_000_000),
    ("{% for i in range(10**9) %}{% endfor %}", 0),
    ("{{ ('x' * 100000).replace('x', 'yy' * 100) }}", 20_000_000),
    ("{{ ('&' * 200000)|forceescape|forceescape }}", 25_000_000),
    ("{{ ('x' * 1000)|list|map('center', 100000)|join }}", 100_000_000),
    ("{% set ns = namespace(s='x' * 1000) %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     1_000_000_000),
    ("{% set ns = namespace(s=['x' * 1000]) %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     8_000_000_000),
    ("{% set ns = namespace(n=10) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", 10**11),
    ("{{ ((10**64)**64)**64 }}", 100_000),
    ("{{ lipsum(100000) }}", 50_000_000),
    # Issue 31, finding 4: bytes methods were not measured, and each UTF-32 step writes four times its input.
    ("{{ 'x'.encode().ljust(1500000000) }}", 1_500_000_000),
    ("{{ 'x'.encode().center(900000000)|length }}", 900_000_000),
    ("{{ ('x' * 200000).encode('utf-32').decode('latin-1').encode('utf-32') }}", 3_200_000),
    ("{{ ('x' * 600000).encode().hex() }}", 1_200_000),
]


@pytest.mark.parametrize("body, built", BUILDERS)
def test_a_template_that_would_build_a_large_value_is_refused_before_it_is_built(body, built):
    renderer = Renderer(notification_budget=Budget(seconds=5.0, max_bytes=1_000_000))
    renderer.notification(template("<p>{{ document.number }}</p>"), DOC, CUSTOMER, SENDER, "nb_NO")  # Jinja's caches
    tracemalloc.start()
    try:
        with pytest.raises(RenderError, match="notification template 'InvoiceNotification'") as raised:
            renderer.notification(template(body), DOC, CUSTOMER, SENDER, "nb_NO")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert re.search("larger than 1000000 bytes|at most 100,000 steps|more than 4,300 digits", str(raised.value))
    assert peak < 3_000_000, f"{peak} bytes were allocated to refuse it"


@pytest.mark.parametrize("body, text", [
    ("{{ company.address|join(', ') }}", "Strandgata 12, 5013 Bergen, Norway"),
    ("{{ company.items()|map('first')|select('eq', 'iban')|join }}", "iban"),
    ("{{ '%05d' % 42 }} {{ '{:>10}'.format(document.number) }}", "00042  CRM000045"),
    ("{{ 'Faktura'|center(11) }}|{{ ('=' * 3) ~ document.number }} {{ document.number * 2 }}",
     "  Faktura  |===CRM000045 CRM000045CRM000045"),
    ("{% for i in range(3) %}{{ loop.index }}{% endfor %} {{ 2 ** 10 }} {{ [1, 2] + [3] }}", "123 1024 [1, 2, 3]"),
    ("{% for c in document.number if c.isdigit() %}{{ c }}{% else %}none{% endfor %}", "000045"),
    ("{{ 'CRM'.encode().decode() }} {{ 'ø'.encode('utf-8')|length }}", "CRM 2"),
    # A macro, a block set and a recursive loop: Jinja joins their output with environment.concat.
    ("{% macro m(x) %}[{{ x }}]{% endmacro %}{{ m(1) ~ m(2) }} {% set b %}in{% endset %}{{ b }}", "[1][2] in"),
    ("{% for x in [1, [2, [3]]] recursive %}{{ loop(x) if x is iterable else x }}{% endfor %}", "123"),
])
def test_ordinary_templates_render_as_before(body, text):
    note = Renderer().notification(template(f"<p>{body}</p>"), DOC, CUSTOMER, SENDER, "nb_NO")
    assert note.html == f"<p>{text}</p>"


@pytest.mark.parametrize("body", [
    "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% for a in s if a %}{% for b in s if b %}{% endfor %}{% endfor %}",
    "{% set s = ('x' * 50000)|list %}{% for a in s %}{% for b in s|reverse %}{% endfor %}{% endfor %}",
], ids=["over-a-string", "with-a-condition", "over-a-list"])
def test_every_loop_is_held_to_the_time_budget(body):
    """Issue 31, finding 4: a ``for`` loop over a string did nothing the clock was checked on (no attribute, no
    call, no output), so two of them nested ran on past a 2 s budget (still running after 25 s). Each step of
    every loop now checks the clock."""
    renderer = Renderer(notification_budget=Budget(seconds=0.5, max_bytes=1_000_000))
    with pytest.raises(RenderError, match=r"notification template 'InvoiceNotification'.*ran for more than 0.5 s"):
        renderer.notification(template(body), DOC, CUSTOMER, SENDER, "nb_NO")


# --- Through a night: the document is a config error, the batch goes on -----------------------------

@pytest.fixture
def night(backend, sink, monkeypatch) -> Night:
    return Night(backend, sink, monkeypatch)


def attached_pdf_text(message) -> str:
    [part] = [p for p in message.iter_attachments() if p.get_content_type() == "application/pdf"]
    return pdf_text(part.get_content())


def night_with_one_bad_template(night: Night, template_id: str, body: str) -> dict:
    """Customer 10001's template is ``body``, customer 10002's the default; each has an invoice. Runs the
    night, checks that only 10002's invoice went out and 10001's is a config error; returns 10001's row."""
    night.erp.template(template_id, "", "Invoice {{ document.number }}", body)
    customer_with_template(night, "10001", "a@bolgen.example", template_id)  # first in the batch
    customer_with_template(night, "10002", "b@havet.example")
    night.erp.invoice("INV000101", "10001")
    night.erp.invoice("INV000102", "10002")

    night.run()

    assert night.arrived() == {("INV000102", "b@havet.example"): 1}
    assert night.status()[("INV000101", "a@bolgen.example")] == ("failed", "config_error")
    [row] = night.rows(ref_nbr="INV000101")
    assert f"'{template_id}'" in row["detail"]
    return row


def test_an_attack_template_fails_its_document_and_the_next_invoice_shows_the_real_seller(night):
    night_with_one_bad_template(night, "Attack", f"<p>{ATTACK}</p>")

    [message] = night.sink.received
    assert_real_seller(attached_pdf_text(message.message))


@pytest.mark.parametrize("body", [
    "<p>{{ '%09000000d' % 1 }}</p>",
    "<p>{{ '{:>9000000}'.format(1) }}</p>",
    "<p>{{ (['x' * 900000] * 20)|join }}</p>",
])
def test_a_template_building_a_large_value_fails_its_document_and_the_next_is_sent(night, body):
    row = night_with_one_bad_template(night, "Builder", body)

    assert "larger than 1000000 bytes" in row["detail"]
