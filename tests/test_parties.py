"""The buyer and the seller on the invoice, as Norwegian law asks: read back from the PDF and the HTML in each locale.

The buyer: its address from customer_address in the locale's order, its organisation number followed by MVA
when it is VAT-registered (bokføringsforskriften § 5-1-1), or a foreign buyer's VAT number; without a
customer_address row the block is the name and Attention, and the ledger says the address was missing. The
seller: "Foretaksregisteret" after its number (foretaksregisterloven § 10-2); its country only for a buyer abroad.
"""

from __future__ import annotations

import pytest

from include.invoice_mailing import ledger
from include.invoice_mailing.render import Renderer
from include.invoice_mailing.rules import Customer, CustomerAddress
from tests.test_documents import document, pages

# (organisation-number label, VAT-number label, the seller's country and Sweden in the locale's words). The
# organisation number is Norway's (the seller's, a Norwegian buyer's): no locale names it after its own register.
LOCALES = {
    "nb_NO": ("Org.nr.", "MVA-nr.", "Norge", "Sverige"),
    "sv_SE": ("Org.nr", "Momsreg.nr", "Norge", "Sverige"),
    "da_DK": ("Org.nr.", "Momsnr.", "Norge", "Sverige"),
    "fi_FI": ("Organisaationro", "ALV-tunnus", "Norja", "Ruotsi"),
    "nl_NL": ("Organisatienr.", "Btw-nr.", "Noorwegen", "Zweden"),
    "en_GB": ("Org. no.", "VAT no.", "Norway", "Sweden"),
}
DOMESTIC = CustomerAddress("10001", "NO", street="Bryggen 7", postal_code="5003", city="Bergen",
                           org_number="987654309", vat_number="NO987654309MVA")
ABROAD = CustomerAddress("10001", "SE", street="Kungsgatan 1", postal_code="111 43", city="Stockholm",
                         org_number="5560360793", vat_number="SE556036079301")


@pytest.fixture(scope="module")
def renderer():
    return Renderer()


def text_of(renderer, locale: str, address: CustomerAddress | None, fmt: str = "PDF") -> str:
    customer = Customer("10001", "Bølgen Kafé & Bakeri AS", "DOMESTIC", locale=locale)
    made = renderer.attachment(document(2), customer, "Kari Nordmann", "invoice", fmt, locale, "AR641000",
                               address=address)
    if fmt == "HTML":
        import html
        import re
        return html.unescape(re.sub(r"<[^>]+>", "\n", made.content.decode()))
    return "\n".join(pages(made.content))


def lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def test_the_organisation_number_labels_are_translated(renderer):
    """The labels the tests below expect are those of the catalogs (checked once, so a typo fails here)."""
    from include.invoice_mailing.i18n import Formats

    for locale, (org, vat, _, _) in LOCALES.items():
        assert (Formats(locale).gettext("Org. no."), Formats(locale).gettext("VAT no.")) == (org, vat), locale


@pytest.mark.parametrize("fmt", ["PDF", "HTML"])
@pytest.mark.parametrize("locale", LOCALES)
def test_a_domestic_business_buyer_gets_its_address_and_number_with_mva(renderer, locale, fmt):
    org, _, norway, _ = LOCALES[locale]
    text = lines(text_of(renderer, locale, DOMESTIC, fmt))

    assert "Bryggen 7" in text
    if locale == "en_GB":  # the town, then the postcode on its own line
        assert text[text.index("Bryggen 7") + 1:text.index("Bryggen 7") + 3] == ["Bergen", "5003"]
    else:
        assert "5003 Bergen" in text
    assert f"{org} 987 654 309 MVA" in text
    assert not any(line == norway for line in text)  # both in Norway: no country printed, neither party's
    assert any(line.endswith("NO 923 456 783 MVA Foretaksregisteret") for line in text)


@pytest.mark.parametrize("locale", LOCALES)
def test_a_buyer_abroad_gets_its_country_and_vat_number_and_the_seller_its_country(renderer, locale):
    _, vat, norway, sweden = LOCALES[locale]
    text = lines(text_of(renderer, locale, ABROAD))

    assert "Kungsgatan 1" in text and sweden in text
    assert f"{vat} SE556036079301" in text
    assert norway in text  # the seller's country, for a buyer abroad


@pytest.mark.parametrize("locale", ["nb_NO", "en_GB"])
def test_without_customer_address_the_block_is_the_name_and_attention(renderer, locale):
    org, _, norway, _ = LOCALES[locale]
    text = lines(text_of(renderer, locale, None))

    assert "Bølgen Kafé & Bakeri AS" in text and any("Kari Nordmann" in line for line in text)
    assert "Bryggen 7" not in text and not any(line.startswith(f"{org} 9") for line in text)
    assert any(line.endswith("Foretaksregisteret") for line in text)


def test_a_document_mailed_without_the_buyers_address_says_so_in_the_ledger(erp, run_dag, sink, ledger_db):
    erp.customer("10001", invoice_email="kari@bolgen.example")
    erp.customer("10002", invoice_email="ola@havet.example")
    erp.address("10002", street="Bryggen 7", postal_code="5003", city="Bergen", org_number="987654309")
    for customer in ("10001", "10002"):
        erp.recipient(erp.setting(customer_id=customer), "Invoicing")
    erp.invoice("INV000101", "10001")
    erp.invoice("INV000201", "10002")

    assert run_dag().state == "success"

    detail = {r["customer_id"]: r["detail"] for r in ledger.all_deliveries(ledger_db, ledger.delivery.c.status == "sent")}
    assert detail == {"10001": "without the buyer's address: the ERP has no customer_address row for customer 10001",
                      "10002": None}
