"""The invoice document as the customer sees it: labels, amounts and dates per locale, the VAT
breakdown, long invoices over many pages, the HTML twin, and PDF/A-3b."""

from __future__ import annotations

import io
import json
import re
import shutil
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from pypdf import PdfReader

from include.invoice_mailing.i18n import Formats
from include.invoice_mailing.render import TEMPLATES_DIR, Renderer
from include.invoice_mailing.rules import Customer, Document, DocumentLine

DAY = date(2026, 11, 23)


def document(lines: int = 3, doc_type: str = "INV", currency: str = "NOK") -> Document:
    rows = []
    for n in range(1, lines + 1):
        quantity, price = Decimal(n % 9 + 1), Decimal("1234.50") + n
        rows.append(DocumentLine(n, f"Kjølevare nr. {n} – «Åsen»", quantity, price, Decimal((25, 15, 12)[n % 3]),
                                 (quantity * price).quantize(Decimal("0.01"))))
    net = sum((r.amount for r in rows), Decimal(0))
    basis = {rate: sum((r.amount for r in rows if r.vat_rate == rate), Decimal(0)) for rate in {r.vat_rate for r in rows}}
    vat = sum(((b * rate / 100).quantize(Decimal("0.01"), ROUND_HALF_UP) for rate, b in basis.items()), Decimal(0))
    return Document(doc_type, f"{doc_type}000123", "10001", "Open", DAY, DAY + timedelta(days=14), currency,
                    net + vat, vat, "Varelevering uke 47", "PO-4471", tuple(rows))


def render(doc: Document, locale: str, fmt: str = "PDF", renderer: Renderer | None = None):
    customer = Customer("10001", "Bølgen Kafé & Bakeri AS", "DOMESTIC", locale=locale)
    return (renderer or Renderer()).attachment(doc, customer, "Kari Nordmann", "invoice", fmt, locale, "AR641000")


def pages(pdf: bytes) -> list[str]:
    return [p.extract_text().replace("\u00a0", " ").replace("\u202f", " ")
            for p in PdfReader(io.BytesIO(pdf)).pages]


LOCALES = {
    "nb_NO": ("Faktura", "Forfallsdato", "Å betale", "KID", "Side 1 av 1", "07.12.2026"),
    "sv_SE": ("Faktura", "Förfallodatum", "Att betala", "OCR-nummer", "Sida 1 av 1", "2026-12-07"),
    "da_DK": ("Faktura", "Forfaldsdato", "At betale", "Betalingsreference", "Side 1 af 1", "07.12.2026"),
    "fi_FI": ("Lasku", "Eräpäivä", "Maksettava", "Viitenumero", "Sivu 1 / 1", "7.12.2026"),
    "nl_NL": ("Factuur", "Vervaldatum", "Te betalen", "Betalingskenmerk", "Pagina 1 van 1", "07-12-2026"),
    "en_GB": ("Invoice", "Due date", "Amount due", "Payment reference", "Page 1 of 1", "07/12/2026"),
}


@pytest.mark.parametrize("locale", LOCALES)
def test_labels_amounts_and_dates_are_in_the_customers_locale(locale):
    doc = document()
    [text] = pages(render(doc, locale).content)
    title, due_label, pay_label, reference_label, page_label, due_date = LOCALES[locale]
    formats = Formats(locale)
    for expected in (title, due_label, pay_label, reference_label, page_label, due_date, "INV000123",
                     "Bølgen Kafé & Bakeri AS", "Kari Nordmann", "Kjølevare nr. 1 – «Åsen»", "PO-4471",
                     formats.amount(doc.vat_amount).replace("\u00a0", " ")):
        assert expected in text, f"{expected!r} missing in {locale}"


@pytest.mark.parametrize("doc_type, nb_title, en_title", [("INV", "Faktura", "Invoice"),
                                                          ("CRM", "Kreditnota", "Credit note"),
                                                          ("DRM", "Debetnota", "Debit note")])
def test_invoice_credit_and_debit_notes_say_what_they_are(doc_type, nb_title, en_title):
    number = f"{doc_type}000123"
    assert f"\n{nb_title}\nNummer {number}\n" in pages(render(document(doc_type=doc_type), "nb_NO").content)[0]
    assert f"\n{en_title}\nNumber {number}\n" in pages(render(document(doc_type=doc_type), "en_GB").content)[0]


def test_a_credit_note_asks_for_no_payment():
    [text] = pages(render(document(doc_type="CRM"), "nb_NO").content)
    assert "Til gode" in text and "Betalingsinformasjon" not in text and "Å betale" not in text


def test_vat_breakdown_per_rate_adds_up_to_the_totals():
    doc = document(lines=9)
    [text] = pages(render(doc, "en_GB").content)
    rows = re.findall(r"^(\d+) % ([\d,]+\.\d\d) ([\d,]+\.\d\d)$", text, re.MULTILINE)
    number = lambda value: Decimal(value.replace(",", ""))  # noqa: E731
    assert sorted(int(rate) for rate, _, _ in rows) == [12, 15, 25]
    for rate, basis, vat in rows:
        lines = [line.amount for line in doc.lines if line.vat_rate == int(rate)]
        assert number(basis) == sum(lines)
        assert abs(number(vat) - number(basis) * int(rate) / 100) <= Decimal("0.05")
    assert sum(number(basis) for _, basis, _ in rows) == doc.amount - doc.vat_amount
    assert sum(number(vat) for _, _, vat in rows) == doc.vat_amount
    assert f"Total excl. VAT {doc.amount - doc.vat_amount:,.2f}" in text
    assert f"Total VAT {doc.vat_amount:,.2f}" in text
    assert f"NOK {doc.amount:,.2f}" in text


def test_a_long_invoice_numbers_its_pages_and_repeats_the_column_headings():
    texts = pages(render(document(lines=300), "nb_NO").content)
    assert len(texts) >= 5
    for number, text in enumerate(texts, start=1):
        assert f"Side {number} av {len(texts)}" in text
        assert "Beskrivelse" in text and "Enhetspris" in text and "Beløp" in text
    assert "Kjølevare nr. 300" in texts[-1] and "Å betale" in texts[-1]


def test_a_2000_line_invoice_renders_every_line():
    texts = pages(render(document(lines=2000), "en_GB").content)
    joined = "\n".join(texts)
    assert len(texts) > 30 and f"Page {len(texts)} of {len(texts)}" in texts[-1]
    assert all(f"Kjølevare nr. {n} " in joined for n in (1, 999, 1000, 2000))


def test_the_html_attachment_is_self_contained_and_says_what_the_pdf_says():
    doc = document()
    html = render(doc, "nb_NO", "HTML").content.decode()
    assert "<style>" in html and "<link" not in html and "src=" not in html and "url(" not in html
    [pdf_text] = pages(render(doc, "nb_NO").content)
    visible = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html.split("</style>")[1])).replace("&amp;", "&")
    for expected in ("Faktura", "INV000123", "Bølgen Kafé & Bakeri AS", "Å betale", "KID", "07.12.2026"):
        assert expected in visible and expected in pdf_text


def test_pdf_a_3b_is_a_setting_of_the_report(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    (templates / "reports" / "settings.json").write_text(json.dumps({"AR641000": {"pdf_variant": "pdf/a-3b"}}))
    pdf = render(document(), "nb_NO", renderer=Renderer(templates)).content
    plain = render(document(), "nb_NO").content
    def pdf_a_part(data: bytes):
        reader = PdfReader(io.BytesIO(data))
        xmp = reader.trailer["/Root"].get("/Metadata")
        found = re.search(rb"pdfaid:part[>=\"']+(\d)", xmp.get_object().get_data()) if xmp else None
        return found and (found.group(1), "/OutputIntents" in reader.trailer["/Root"])

    assert pdf_a_part(pdf) == (b"3", True)
    assert not pdf_a_part(plain)
    assert "Bølgen Kafé" in pages(pdf)[0]
