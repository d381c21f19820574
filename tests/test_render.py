"""Rendering without a database or SMTP: localised formats and names, escaping, the sandbox."""

from __future__ import annotations

import logging
import re
from datetime import date
from decimal import Decimal

import pytest

from include.invoice_mailing.i18n import Formats
from include.invoice_mailing.render import (
    Renderer,
    RenderError,
    attachment_filename,
    html_to_text,
    payment_reference,
)
from include.invoice_mailing.rules import Customer, Document, DocumentLine, NotificationTemplate

DOC = Document("CRM", "CRM000045", "10001", "Open", date(2026, 11, 23), None, "NOK", Decimal("1234567.89"),
               Decimal("0"), lines=(DocumentLine(1, "Kjølerom, retur", Decimal("1"), Decimal("1234567.89"), Decimal("0"),
                                                 Decimal("1234567.89")),))
CUSTOMER = Customer("10001", "Bølgen Kafé AS", "DOMESTIC", locale="nb_NO")


def plain(text: str) -> str:
    return text.replace("\u00a0", " ").replace("\u202f", " ")


@pytest.mark.parametrize("locale, amount, day", [
    ("nb_NO", "1 234 567,89", "23.11.2026"),
    ("sv_SE", "1 234 567,89", "2026-11-23"),
    ("da_DK", "1.234.567,89", "23.11.2026"),
    ("fi_FI", "1 234 567,89", "23.11.2026"),
    ("nl_NL", "1.234.567,89", "23-11-2026"),
    ("en_GB", "1,234,567.89", "23/11/2026"),
])
def test_amounts_and_dates_are_written_as_the_customers_locale_writes_them(locale, amount, day):
    formats = Formats(locale)
    assert plain(formats.amount(Decimal("1234567.89"))) == amount
    assert formats.date(date(2026, 11, 23)) == day


@pytest.mark.parametrize("locale, name", [
    ("nb_NO", "Kreditnota CRM000045.pdf"), ("sv_SE", "Kreditfaktura CRM000045.pdf"),
    ("fi_FI", "Hyvityslasku CRM000045.pdf"), ("nl_NL", "Creditnota CRM000045.pdf"),
    ("en_GB", "Credit note CRM000045.pdf"),
])
def test_attachment_is_named_after_the_document_in_the_customers_language(locale, name):
    assert attachment_filename(DOC, "PDF", Formats(locale)) == name


def test_unknown_locale_falls_back_to_english_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert Formats("xx_YY").locale == "en_GB"
    assert "xx_YY" in caplog.text


def test_payment_reference_carries_a_valid_mod10_check_digit():
    reference = payment_reference("10001", "INV000101", "nb_NO")
    assert reference.startswith("10001000101")
    digits = [int(d) for d in reversed(reference)]
    assert sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits)) % 10 == 0


def test_plain_text_alternative_keeps_the_words_and_drops_the_markup():
    text = html_to_text("<style>p{}</style><p>Hei Kari,</p><p>Faktura <b>INV000101</b> &amp; KID</p>")
    assert text == "Hei Kari,\n\nFaktura INV000101 & KID\n"


def template(body: str, subject: str = "{{ document.type_label }} {{ document.number }}") -> NotificationTemplate:
    return NotificationTemplate("InvoiceNotification", "", subject, body)


def test_notification_escapes_erp_values_and_keeps_the_subject_on_one_line():
    customer = Customer("10001", "<b>Evil</b> & Co", "DOMESTIC", locale="nb_NO")
    note = Renderer().notification(template("<p>{{ customer.name }}</p>", "Faktura\r\nBcc: x@y.no"), DOC,
                                   customer, {"address": "a@b.no", "name": ""}, "nb_NO")
    assert "&lt;b&gt;Evil&lt;/b&gt; &amp; Co" in note.html
    assert note.subject == "Faktura Bcc: x@y.no"


@pytest.mark.parametrize("body, error", [
    ("{{ document.__class__.__mro__ }}", "SecurityError|UndefinedError"),
    ("{{ ''.__class__.__subclasses__() }}", "SecurityError"),
    ("{% for x in range(10**9) %}{% endfor %}{{ broken", "TemplateSyntaxError"),
    # These parse; they fail only while rendering.
    ("{{ document.amount / 0 }}", "TypeError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ '%s and %s' % document.number }}", "TypeError: not enough arguments"),
    ("{{ document.lines[5].amount }}", "UndefinedError"),
    ("{{ customer.nmae }}", "customer.nmae is undefined"),
    ("{{ recipient }}", "'recipient' is undefined"),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "RecursionError"),
    ("{% for i in range(10**6) %}{% endfor %}", "at most 100,000 steps"),
])
def test_an_unsafe_or_broken_template_is_a_render_error_naming_template_and_error(body, error):
    with pytest.raises(RenderError, match="InvoiceNotification") as raised:
        Renderer().notification(template(body), DOC, CUSTOMER, {"address": "a@b.no", "name": ""}, "nb_NO")
    assert re.search(error, str(raised.value)), str(raised.value)


def test_a_template_sees_the_erp_column_names_beside_the_friendly_ones():
    body = ("{{ document.ref_nbr }}={{ document.number }} {{ document.doc_type }}={{ document.type }} "
            "{{ document.doc_date }}={{ document.date }} {{ customer.customer_id }}={{ customer.number }} "
            "{{ sender.display_name }}={{ sender.name }} {{ document.vat_amount }}={{ document.total_vat }}")
    note = Renderer().notification(template(body), DOC, CUSTOMER, {"address": "a@b.no", "name": "Fjordlys"}, "nb_NO")
    assert note.text.strip() == "CRM000045=CRM000045 CRM=CRM 23.11.2026=23.11.2026 10001=10001 Fjordlys=Fjordlys 0,00=0,00"


def test_missing_report_template_is_a_render_error():
    with pytest.raises(RenderError, match="no_such_form"):
        Renderer().attachment(DOC, CUSTOMER, None, "no_such_form", "PDF", "nb_NO")


@pytest.mark.parametrize("body, error", [
    ("<p>{{ doc.number }} {{ doc.totl }}</p>", "document.totl is undefined"),
    ("<p>{{ doc.total + 1 }}</p>", "TypeError"),  # amounts are formatted text
    ("<p>{{ doc.ref_nbr }} {{ doc.doc_date }} {{ 1 // 0 }}</p>", "ZeroDivisionError"),
])
def test_a_report_template_that_fails_at_run_time_is_a_render_error(tmp_path, body, error):
    import shutil

    from include.invoice_mailing.render import TEMPLATES_DIR

    shutil.copy(TEMPLATES_DIR / "company.json", tmp_path / "company.json")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "broken.html.j2").write_text(body)
    (tmp_path / "reports" / "broken.css").write_text("p { margin: 0 }")
    with pytest.raises(RenderError, match="'broken' \\(nb_NO\\)") as raised:
        Renderer(templates_dir=tmp_path).attachment(DOC, CUSTOMER, None, "broken", "HTML", "nb_NO")
    assert error in str(raised.value)


def _embedded_fonts(pdf: bytes) -> dict[str, int]:
    """Base font name -> bytes of its embedded font program."""
    import io

    from pypdf import PdfReader

    fonts = {}
    for page in PdfReader(io.BytesIO(pdf)).pages:
        for font in page["/Resources"]["/Font"].values():
            font = font.get_object()
            descriptor = (font["/DescendantFonts"][0].get_object() if "/DescendantFonts" in font else font)
            program = descriptor["/FontDescriptor"].get_object()["/FontFile2"].get_object()
            fonts[str(font["/BaseFont"]).split("+")[-1]] = len(program.get_data())
    return fonts


@pytest.mark.parametrize("harfbuzz", [True, False], ids=["harfbuzz-subset", "fonttools"])
def test_a_pdf_embeds_only_what_it_draws_with_either_subsetter(monkeypatch, harfbuzz):
    """Without HarfBuzz's subsetter the shipped fonts (subsets already) go in whole rather than being
    subset by fontTools at 30 ms a document; a character they lack still brings only a subset of the
    system font that draws it, never a whole one (DejaVu Sans is 700 kB)."""
    import io

    import weasyprint.pdf.fonts
    from pypdf import PdfReader

    if not harfbuzz:
        monkeypatch.setattr(weasyprint.pdf.fonts, "harfbuzz_subset", None)
    elif not weasyprint.pdf.fonts.harfbuzz_subset:
        pytest.skip("libharfbuzz-subset0 is not installed (dev/system-packages install)")
    renderer = Renderer()
    shipped = renderer.attachment(DOC, CUSTOMER, "Kari Nordmann", "invoice", "PDF", "nb_NO").content
    foreign = renderer.attachment(DOC, Customer("10001", "Ольга Øvrebø AS", "DOMESTIC", locale="nb_NO"),
                                  None, "invoice", "PDF", "nb_NO").content

    fonts = _embedded_fonts(shipped)
    assert set(fonts) == {"Invoice-Sans", "Invoice-Sans-Bold"}
    whole = (renderer.templates_dir / "fonts" / "InvoiceSans-Regular.ttf").stat().st_size
    assert (fonts["Invoice-Sans"] == whole) is (not harfbuzz)
    fallback = _embedded_fonts(foreign)
    assert len(fallback) == 3 and all(size < 40_000 for size in fallback.values()), fallback
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(foreign)).pages)
    assert "Ольга Øvrebø AS" in text
