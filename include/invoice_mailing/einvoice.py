"""The e-invoice model: one place for an ERP document's numbers, rendered as CII (Factur-X) and UBL (EHF).

``figures(document)`` recomputes what the ERP stored (lines, VAT per rate rounded per rate, totals) and
refuses a document whose stored totals contradict its lines by more than one rounding step; the PDF, the
CII and the UBL all print these figures. ``build()`` adds the parties (seller from company.json, buyer from
``customer_address``), the VAT categories and the payment; ``to_cii()`` and ``to_ubl()`` only write XML.
Whatever cannot be made valid raises ``EInvoiceError``, whose text starts with the rule's id.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

from lxml import etree

from include.invoice_mailing import identifiers
from include.invoice_mailing.rules import Customer, CustomerAddress, Document

CENT = Decimal("0.01")
ROUNDING_STEP = CENT  # one rounding step: what the ERP's totals may differ from the lines' figures by

TYPE_CODES = {"INV": "380", "CRM": "381", "DRM": "383"}  # UNTDID 1001: invoice, credit note, debit note
UNIT_CODE = "C62"  # UN/ECE rec 20 "one": the ERP's lines have no unit of measure
CII_GUIDELINE = "urn:cen.eu:en16931:2017"
UBL_CUSTOMIZATION = "urn:cen.eu:en16931:2017#compliant#urn:fdc:peppol.eu:2017:poacc:billing:3.0"
UBL_PROFILE = "urn:fdc:peppol.eu:2017:poacc:billing:01:1.0"
CREDIT_NOTE_TERMS = "Credit note: the amount is credited to the buyer; nothing to pay."

EU = frozenset("AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK".split())
SEPA = EU | frozenset("NO IS LI CH GB MC SM VA AD".split())


# --- Errors -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Violation:
    """One broken rule: its id (``BR-11``, ``XSD``, ``ERP-TOTALS``), flag (fatal/warning), text, where."""

    rule: str
    flag: str
    text: str
    location: str = ""

    def __str__(self) -> str:
        return f"{self.rule} {self.text}"


class EInvoiceError(Exception):
    """The document cannot be made a valid e-invoice; ``str()`` leads with the rule ids an auditor greps."""

    def __init__(self, violations: Sequence[Violation], warnings: Sequence[Violation] = ()):
        self.violations = tuple(violations)
        self.warnings = tuple(warnings)
        super().__init__("; ".join(str(v) for v in self.violations))


def _fatal(rule: str, text: str) -> EInvoiceError:
    return EInvoiceError([Violation(rule, "fatal", text)])


# --- 1. The figures ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LineFigures:
    line_nbr: int
    description: str
    quantity: Decimal
    unit_price: Decimal
    vat_rate: Decimal
    net: Decimal  # the ERP's line amount, excl. VAT


@dataclass(frozen=True)
class RateFigures:
    rate: Decimal
    basis: Decimal
    vat: Decimal  # basis x rate, rounded once per rate (BR-CO-17)


@dataclass(frozen=True)
class Figures:
    currency: str
    lines: tuple[LineFigures, ...]
    rates: tuple[RateFigures, ...]  # ascending rate
    line_total: Decimal  # BT-106
    vat_total: Decimal  # BT-110: the sum of the per-rate VAT
    total_excl_vat: Decimal  # BT-109 (no document-level allowances or charges)
    total_incl_vat: Decimal  # BT-112
    rounding: Decimal  # BT-114: what the ERP's amount differs from BT-112 by, at most one rounding step
    payable: Decimal  # BT-115: the ERP's amount, as the PDF and the bank see it


def _cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, ROUND_HALF_UP)


def figures(document: Document) -> Figures:
    """The document's numbers as EN 16931 computes them, checked against what the ERP stored.

    VAT is rounded per rate, never per line (BR-CO-17): an ERP that rounds per line is off by a cent
    now and then, which the rounding amount (BT-114) absorbs; more than one step is a contradiction,
    refused here rather than mailed. Credit notes carry positive amounts, as the ERP stores them.
    """
    problems: list[Violation] = []
    if not document.lines:
        problems.append(Violation("BR-16", "fatal", f"{document.ref_nbr} has no lines: an invoice shall "
                                                    "have at least one invoice line"))
    lines = tuple(LineFigures(line.line_nbr, line.description, line.quantity, line.unit_price, line.vat_rate,
                              line.amount) for line in document.lines)
    for line in lines:
        expected = _cents(line.quantity * line.unit_price)
        if abs(expected - line.net) > ROUNDING_STEP:
            problems.append(Violation(
                "ERP-LINE", "fatal", f"line {line.line_nbr}: quantity {_plain(line.quantity)} x unit price "
                f"{_price(line.unit_price)} is {expected}, but the ERP's line amount is {_amount(line.net)}"))
    bases: dict[Decimal, Decimal] = {}
    for line in lines:
        bases[line.vat_rate] = bases.get(line.vat_rate, Decimal(0)) + line.net
    rates = tuple(RateFigures(rate, bases[rate], _cents(bases[rate] * rate / 100)) for rate in sorted(bases))
    line_total = sum((line.net for line in lines), Decimal(0))
    vat_total = sum((r.vat for r in rates), Decimal(0))
    total_incl_vat = line_total + vat_total
    if abs(document.vat_amount - vat_total) > ROUNDING_STEP:
        problems.append(Violation(
            "ERP-TOTALS", "fatal", f"the ERP's VAT {_amount(document.vat_amount)} disagrees with its lines' VAT "
            f"{_amount(vat_total)} (BR-CO-17: per rate, basis x rate rounded once: "
            + ", ".join(f"{_plain(r.rate)}% of {_amount(r.basis)} = {_amount(r.vat)}" for r in rates) + ")"))
    rounding = document.amount - total_incl_vat
    if abs(rounding) > ROUNDING_STEP:
        problems.append(Violation(
            "ERP-TOTALS", "fatal", f"the ERP's amount {_amount(document.amount)} disagrees with its lines' total "
            f"{_amount(total_incl_vat)} ({_amount(line_total)} + VAT {_amount(vat_total)}) by more than one rounding "
            "step"))
    if problems:
        raise EInvoiceError(problems)
    return Figures(document.currency, lines, rates, line_total, vat_total, line_total, total_incl_vat,
                   rounding, document.amount)


# --- 2. The whole e-invoice -------------------------------------------------------------------

@dataclass(frozen=True)
class Category:
    """A VAT category (UNCL 5305) with the exemption reason the category needs, if any."""

    code: str
    exemption_code: str | None = None
    exemption_text: str | None = None


def vat_category(rate: Decimal, seller_country: str, buyer_country: str) -> Category:
    """Standard rate above 0; at 0, zero-rated at home, intra-community between two EU countries, else
    export (the seller is Norwegian, outside the EU: a sale abroad is an export)."""
    if rate > 0:
        return Category("S")
    if buyer_country == seller_country:
        return Category("Z")
    if seller_country in EU and buyer_country in EU:
        return Category("K", "VATEX-EU-IC", "Intra-community supply")
    return Category("G", "VATEX-EU-G", "Export outside the EU")


@dataclass(frozen=True)
class Identifier:
    value: str
    scheme: str | None = None


@dataclass(frozen=True)
class Party:
    name: str
    country_code: str
    street: str | None = None
    postal_code: str | None = None
    city: str | None = None
    vat_number: str | None = None  # BT-31 / BT-48
    legal_id: Identifier | None = None  # BT-30 / BT-47
    legal_form: str | None = None  # BT-33 ("Foretaksregisteret")
    endpoint: Identifier | None = None  # BT-34 / BT-49
    contact_name: str | None = None
    phone: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class Payment:
    means_code: str  # UNCL 4461: 30 credit transfer, 58 SEPA credit transfer
    iban: str | None
    bic: str | None
    reference: str  # BT-83: the KID the bank matches the payment by


@dataclass(frozen=True)
class TaxRow:
    category: Category
    rate: Decimal
    basis: Decimal
    vat: Decimal


@dataclass(frozen=True)
class EInvoice:
    number: str
    type_code: str
    doc_type: str
    issue_date: date
    due_date: date | None
    note: str | None
    buyer_reference: str  # BT-10: PEPPOL-EN16931-R003 wants it (or an order reference)
    order_reference: str | None  # BT-13
    figures: Figures
    taxes: tuple[TaxRow, ...]  # per (category, rate)
    line_categories: tuple[Category, ...]  # parallel to figures.lines
    seller: Party
    buyer: Party
    payment: Payment
    payment_terms: str | None  # BT-20: what a document without a due date says instead
    delivery_date: date | None = None  # BT-72, given only where a category needs it (K: BR-IC-11)
    delivery_country: str | None = None  # BT-80 (K: BR-IC-12)

    @property
    def is_credit_note(self) -> bool:
        return self.doc_type == "CRM"


def _identifier(text: str | None) -> Identifier | None:
    """``"0192:923456783"`` -> Identifier("923456783", "0192"); a value without a scheme has none."""
    if not text or not text.strip():
        return None
    scheme, sep, value = text.strip().partition(":")
    return Identifier(value.strip(), scheme.strip()) if sep else Identifier(scheme)


def _clean(text: str | None) -> str | None:
    return text.strip() if text and text.strip() else None


# The business term (EN 16931) each seller setting and customer_address column carries: a wrong check digit
# is reported under it, as the schematron reports its rules.
SELLER_TERMS = {"name": "BT-27", "org_number": "BT-30", "vat_number": "BT-31", "register": "BT-33",
                "peppol_id": "BT-34", "street": "BT-35", "city": "BT-37", "postal_code": "BT-38",
                "country_code": "BT-40", "iban": "BT-84", "bank_account": "BT-84", "bic": "BT-86"}
BUYER_TERMS = {"org_number": "BT-47", "vat_number": "BT-48", "peppol_id": "BT-49", "street": "BT-50",
               "city": "BT-52", "postal_code": "BT-53", "country_code": "BT-55"}


def _identifier_violations(company: Mapping, address: CustomerAddress) -> list[Violation]:
    """The seller's settings and the buyer's columns as python-stdnum checks them (``identifiers``), each
    problem under the business term its value fills (``BT-48 customer_address.vat_number ...``)."""
    return [Violation(terms.get(problem.column, "BT"), "fatal", problem.text)
            for problems, terms in ((identifiers.seller_problems(company), SELLER_TERMS),
                                    (identifiers.buyer_problems(address), BUYER_TERMS))
            for problem in problems]


def build(document: Document, customer: Customer, address: CustomerAddress | None, company: Mapping,
          payment_reference: str) -> EInvoice:
    """The e-invoice of ``document``: figures, parties, categories and payment; raises ``EInvoiceError``."""
    if address is None:
        raise _fatal("BR-11", f"the buyer's country code is required, and customer {customer.customer_id} "
                              "has no customer_address row")
    numbers = figures(document)
    identifiers_wrong = _identifier_violations(company, address)
    if identifiers_wrong:
        raise EInvoiceError(identifiers_wrong)
    seller_country = (company.get("country_code") or "").strip().upper()
    buyer_country = (address.country_code or "").strip().upper()
    categories = {r.rate: vat_category(r.rate, seller_country, buyer_country) for r in numbers.rates}
    problems = []
    if not _clean(company.get("vat_number")) and any(c.code == "S" for c in categories.values()):
        # The schematron would accept the Foretaksregisteret tax registration instead (BT-32): not here.
        problems.append(Violation("BR-S-02", "fatal", "a document with standard-rated lines shall contain the "
                                  "seller's VAT identifier (BT-31): company.json has no vat_number"))
    if any(c.code == "K" for c in categories.values()) and not _clean(address.vat_number):
        problems.append(Violation("BR-IC-02", "fatal", "an intra-community supply (category K) shall contain "
                                  f"the buyer's VAT identifier (BT-48): customer {customer.customer_id}'s "
                                  "customer_address has no vat_number"))
    if problems:
        raise EInvoiceError(problems)

    seller_endpoint = _identifier(company.get("peppol_id"))
    org_number = _clean(company.get("org_number"))
    seller = Party(
        name=company["name"], country_code=seller_country, street=_clean(company.get("street")),
        postal_code=_clean(company.get("postal_code")), city=_clean(company.get("city")),
        vat_number=_clean(company.get("vat_number")),
        legal_id=Identifier(org_number, "0192" if seller_country == "NO" else None) if org_number else None,
        legal_form=(_clean(company.get("register")) or "Foretaksregisteret") if seller_country == "NO" else None,
        endpoint=seller_endpoint, contact_name=company.get("name"), phone=_clean(company.get("phone")),
        email=_clean(company.get("email")))
    buyer_org = _clean(address.org_number)
    buyer_endpoint = _identifier(address.peppol_id)
    if buyer_endpoint is None and buyer_org and buyer_country == "NO":
        buyer_endpoint = Identifier(re.sub(r"\D", "", buyer_org), "0192")
    if buyer_endpoint is None and _clean(customer.email):
        buyer_endpoint = Identifier(customer.email.strip(), "EM")  # EAS "EM": the address the invoice goes to
    buyer = Party(
        name=customer.name, country_code=buyer_country, street=_clean(address.street),
        postal_code=_clean(address.postal_code), city=_clean(address.city), vat_number=_clean(address.vat_number),
        legal_id=Identifier(re.sub(r"\D", "", buyer_org), "0192") if buyer_org and buyer_country == "NO" else
        Identifier(buyer_org) if buyer_org else None,
        endpoint=buyer_endpoint)

    iban = re.sub(r"\s", "", company.get("iban") or "") or None
    sepa_euro = document.currency == "EUR" and seller_country in SEPA and buyer_country in SEPA
    payment = Payment("58" if sepa_euro and iban else "30", iban, _clean(company.get("bic")), payment_reference)
    taxes = tuple(TaxRow(categories[r.rate], r.rate, r.basis, r.vat) for r in numbers.rates)
    # The ERP has no delivery date; an intra-community supply must state one, and the document date is the
    # date the ERP's users treat as the supply's.
    intra_community = any(c.code == "K" for c in categories.values())
    return EInvoice(
        number=document.ref_nbr, type_code=TYPE_CODES[document.doc_type], doc_type=document.doc_type,
        issue_date=document.doc_date, due_date=document.due_date, note=_clean(document.description),
        buyer_reference=_clean(document.customer_ref) or customer.customer_id,
        order_reference=_clean(document.customer_ref), figures=numbers, taxes=taxes,
        line_categories=tuple(categories[line.vat_rate] for line in numbers.lines),
        seller=seller, buyer=buyer, payment=payment,
        payment_terms=None if document.due_date else CREDIT_NOTE_TERMS if document.doc_type == "CRM" else
        "Payable on receipt.",
        delivery_date=document.doc_date if intra_community else None,
        delivery_country=buyer_country if intra_community else None)


# --- Number formats ---------------------------------------------------------------------------

def _amount(value: Decimal) -> str:
    return str(_cents(value))


def _plain(value: Decimal) -> str:
    """A quantity or rate as written by a person: ``2.5``, ``0.375``, ``12``; never ``1E+1``."""
    return format(value.normalize(), "f")


def _price(value: Decimal) -> str:
    """A unit price: at least 2 decimals, and every further decimal the ERP stored (``12.3456``)."""
    exponent = value.normalize().as_tuple().exponent
    return str(value.quantize(Decimal(1).scaleb(min(-2, exponent))))


# --- 3. CII (Factur-X, EN 16931) --------------------------------------------------------------

RSM = "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"
RAM = "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100"
UDT = "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100"
QDT = "urn:un:unece:uncefact:data:standard:QualifiedDataType:100"
CII_NS = {"rsm": RSM, "ram": RAM, "udt": UDT, "qdt": QDT}


class _Writer:
    """``w.el(parent, "ram:ID", text, schemeID=...)``: one child in a prefixed namespace; None text = absent."""

    def __init__(self, namespaces: Mapping[str, str]):
        self.ns = namespaces

    def qname(self, name: str) -> str:
        prefix, local = name.split(":")
        return f"{{{self.ns[prefix]}}}{local}"

    def el(self, parent, name: str, text: str | None = None, **attributes: str | None):
        node = etree.SubElement(parent, self.qname(name))
        if text is not None:
            node.text = text
        for key, value in attributes.items():
            if value is not None:
                node.set(key, value)
        return node

    def opt(self, parent, name: str, text: str | None, **attributes: str | None):
        return self.el(parent, name, text, **attributes) if text is not None else None


def _serialise(root) -> bytes:
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _cii_date(w: _Writer, parent, name: str, value: date):
    w.el(w.el(parent, name), "udt:DateTimeString", value.strftime("%Y%m%d"), format="102")


def _cii_party(w: _Writer, parent, name: str, party: Party, with_contact: bool):
    node = w.el(parent, name)
    w.el(node, "ram:Name", party.name)
    if party.legal_form:
        w.el(node, "ram:Description", party.legal_form)
    if party.legal_id:
        w.el(node, "ram:SpecifiedLegalOrganization")
        w.el(node[-1], "ram:ID", party.legal_id.value, schemeID=party.legal_id.scheme)
    if with_contact and (party.phone or party.email):
        contact = w.el(node, "ram:DefinedTradeContact")
        w.opt(contact, "ram:PersonName", party.contact_name)
        if party.phone:
            w.el(w.el(contact, "ram:TelephoneUniversalCommunication"), "ram:CompleteNumber", party.phone)
        if party.email:
            w.el(w.el(contact, "ram:EmailURIUniversalCommunication"), "ram:URIID", party.email)
    address = w.el(node, "ram:PostalTradeAddress")
    w.opt(address, "ram:PostcodeCode", party.postal_code)
    w.opt(address, "ram:LineOne", party.street)
    w.opt(address, "ram:CityName", party.city)
    w.el(address, "ram:CountryID", party.country_code)
    if party.endpoint:
        w.el(w.el(node, "ram:URIUniversalCommunication"), "ram:URIID", party.endpoint.value,
             schemeID=party.endpoint.scheme)
    if party.vat_number:
        w.el(w.el(node, "ram:SpecifiedTaxRegistration"), "ram:ID", party.vat_number, schemeID="VA")
    if party.legal_form == "Foretaksregisteret":  # NO-R-002 (PEPPOL's CII binding: scheme FC)
        w.el(w.el(node, "ram:SpecifiedTaxRegistration"), "ram:ID", party.legal_form, schemeID="FC")


def _cii_tax(w: _Writer, parent, category: Category, rate: Decimal, basis: Decimal | None = None,
             vat: Decimal | None = None):
    tax = w.el(parent, "ram:ApplicableTradeTax")
    if vat is not None:
        w.el(tax, "ram:CalculatedAmount", _amount(vat))
    w.el(tax, "ram:TypeCode", "VAT")
    if basis is not None:
        w.opt(tax, "ram:ExemptionReason", category.exemption_text)
        w.el(tax, "ram:BasisAmount", _amount(basis))
    w.el(tax, "ram:CategoryCode", category.code)
    if basis is not None:
        w.opt(tax, "ram:ExemptionReasonCode", category.exemption_code)
    w.el(tax, "ram:RateApplicablePercent", _plain(rate))


def to_cii(inv: EInvoice) -> bytes:
    """The Factur-X ``factur-x.xml`` (UN/CEFACT CII D16B, EN 16931 profile); same input, same bytes."""
    w = _Writer(CII_NS)
    root = etree.Element(w.qname("rsm:CrossIndustryInvoice"), nsmap=CII_NS)
    context = w.el(root, "rsm:ExchangedDocumentContext")
    w.el(w.el(context, "ram:GuidelineSpecifiedDocumentContextParameter"), "ram:ID", CII_GUIDELINE)
    header = w.el(root, "rsm:ExchangedDocument")
    w.el(header, "ram:ID", inv.number)
    w.el(header, "ram:TypeCode", inv.type_code)
    _cii_date(w, header, "ram:IssueDateTime", inv.issue_date)
    if inv.note:
        w.el(w.el(header, "ram:IncludedNote"), "ram:Content", inv.note)

    transaction = w.el(root, "rsm:SupplyChainTradeTransaction")
    for line, category in zip(inv.figures.lines, inv.line_categories, strict=True):
        item = w.el(transaction, "ram:IncludedSupplyChainTradeLineItem")
        w.el(w.el(item, "ram:AssociatedDocumentLineDocument"), "ram:LineID", str(line.line_nbr))
        w.el(w.el(item, "ram:SpecifiedTradeProduct"), "ram:Name", line.description)
        agreement = w.el(item, "ram:SpecifiedLineTradeAgreement")
        w.el(w.el(agreement, "ram:NetPriceProductTradePrice"), "ram:ChargeAmount", _price(line.unit_price))
        w.el(w.el(item, "ram:SpecifiedLineTradeDelivery"), "ram:BilledQuantity", _plain(line.quantity),
             unitCode=UNIT_CODE)
        settlement = w.el(item, "ram:SpecifiedLineTradeSettlement")
        _cii_tax(w, settlement, category, line.vat_rate)
        w.el(w.el(settlement, "ram:SpecifiedTradeSettlementLineMonetarySummation"), "ram:LineTotalAmount",
             _amount(line.net))

    agreement = w.el(transaction, "ram:ApplicableHeaderTradeAgreement")
    w.el(agreement, "ram:BuyerReference", inv.buyer_reference)
    _cii_party(w, agreement, "ram:SellerTradeParty", inv.seller, with_contact=True)
    _cii_party(w, agreement, "ram:BuyerTradeParty", inv.buyer, with_contact=False)
    if inv.order_reference:
        w.el(w.el(agreement, "ram:BuyerOrderReferencedDocument"), "ram:IssuerAssignedID", inv.order_reference)
    delivery = w.el(transaction, "ram:ApplicableHeaderTradeDelivery")
    if inv.delivery_country:
        ship_to = w.el(w.el(delivery, "ram:ShipToTradeParty"), "ram:PostalTradeAddress")
        w.el(ship_to, "ram:CountryID", inv.delivery_country)
    if inv.delivery_date:
        _cii_date(w, w.el(delivery, "ram:ActualDeliverySupplyChainEvent"), "ram:OccurrenceDateTime",
                  inv.delivery_date)

    settlement = w.el(transaction, "ram:ApplicableHeaderTradeSettlement")
    w.el(settlement, "ram:PaymentReference", inv.payment.reference)
    w.el(settlement, "ram:InvoiceCurrencyCode", inv.figures.currency)
    means = w.el(settlement, "ram:SpecifiedTradeSettlementPaymentMeans")
    w.el(means, "ram:TypeCode", inv.payment.means_code)
    if inv.payment.iban:
        w.el(w.el(means, "ram:PayeePartyCreditorFinancialAccount"), "ram:IBANID", inv.payment.iban)
    if inv.payment.bic:
        w.el(w.el(means, "ram:PayeeSpecifiedCreditorFinancialInstitution"), "ram:BICID", inv.payment.bic)
    for row in inv.taxes:
        _cii_tax(w, settlement, row.category, row.rate, row.basis, row.vat)
    terms = w.el(settlement, "ram:SpecifiedTradePaymentTerms")
    w.opt(terms, "ram:Description", inv.payment_terms)
    if inv.due_date:
        _cii_date(w, terms, "ram:DueDateDateTime", inv.due_date)
    totals = w.el(settlement, "ram:SpecifiedTradeSettlementHeaderMonetarySummation")
    f = inv.figures
    w.el(totals, "ram:LineTotalAmount", _amount(f.line_total))
    w.el(totals, "ram:TaxBasisTotalAmount", _amount(f.total_excl_vat))
    w.el(totals, "ram:TaxTotalAmount", _amount(f.vat_total), currencyID=f.currency)
    if f.rounding:
        w.el(totals, "ram:RoundingAmount", _amount(f.rounding))
    w.el(totals, "ram:GrandTotalAmount", _amount(f.total_incl_vat))
    w.el(totals, "ram:DuePayableAmount", _amount(f.payable))
    return _serialise(root)


# --- 4. UBL (PEPPOL BIS Billing 3.0, EHF) -----------------------------------------------------

CAC = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
CBC = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
UBL_INVOICE = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
UBL_CREDIT_NOTE = "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2"


def _ubl_address(w: _Writer, parent, party: Party):
    address = w.el(parent, "cac:PostalAddress")
    w.opt(address, "cbc:StreetName", party.street)
    w.opt(address, "cbc:CityName", party.city)
    w.opt(address, "cbc:PostalZone", party.postal_code)
    w.el(w.el(address, "cac:Country"), "cbc:IdentificationCode", party.country_code)


def _ubl_tax_scheme(w: _Writer, parent, company_id: str, scheme: str):
    tax_scheme = w.el(parent, "cac:PartyTaxScheme")
    w.el(tax_scheme, "cbc:CompanyID", company_id)
    w.el(w.el(tax_scheme, "cac:TaxScheme"), "cbc:ID", scheme)


def _ubl_party(w: _Writer, parent, name: str, party: Party, with_contact: bool):
    node = w.el(w.el(parent, name), "cac:Party")
    if party.endpoint:
        w.el(node, "cbc:EndpointID", party.endpoint.value, schemeID=party.endpoint.scheme)
    w.el(w.el(node, "cac:PartyName"), "cbc:Name", party.name)
    _ubl_address(w, node, party)
    if party.vat_number:
        _ubl_tax_scheme(w, node, party.vat_number, "VAT")
    if party.legal_form == "Foretaksregisteret":  # NO-R-002: PEPPOL reads it as a TAX registration
        _ubl_tax_scheme(w, node, party.legal_form, "TAX")
    legal = w.el(node, "cac:PartyLegalEntity")
    w.el(legal, "cbc:RegistrationName", party.name)
    if party.legal_id:
        w.el(legal, "cbc:CompanyID", party.legal_id.value, schemeID=party.legal_id.scheme)
    w.opt(legal, "cbc:CompanyLegalForm", party.legal_form)
    if with_contact and (party.phone or party.email):
        contact = w.el(node, "cac:Contact")
        w.opt(contact, "cbc:Name", party.contact_name)
        w.opt(contact, "cbc:Telephone", party.phone)
        w.opt(contact, "cbc:ElectronicMail", party.email)


def _ubl_category(w: _Writer, parent, name: str, category: Category, rate: Decimal, with_reason: bool):
    node = w.el(parent, name)
    w.el(node, "cbc:ID", category.code)
    w.el(node, "cbc:Percent", _plain(rate))
    if with_reason:
        w.opt(node, "cbc:TaxExemptionReasonCode", category.exemption_code)
        w.opt(node, "cbc:TaxExemptionReason", category.exemption_text)
    w.el(w.el(node, "cac:TaxScheme"), "cbc:ID", "VAT")


def to_ubl(inv: EInvoice, pdf: bytes, pdf_name: str) -> bytes:
    """The EHF document: UBL 2.1 ``Invoice`` (``CreditNote`` for a credit note), the PDF embedded; elements
    in the order the XSD's sequences demand."""
    credit = inv.is_credit_note
    namespaces = {None: UBL_CREDIT_NOTE if credit else UBL_INVOICE, "cac": CAC, "cbc": CBC}
    w = _Writer({"cac": CAC, "cbc": CBC})
    root = etree.Element(f"{{{namespaces[None]}}}{'CreditNote' if credit else 'Invoice'}", nsmap=namespaces)
    currency = inv.figures.currency
    w.el(root, "cbc:CustomizationID", UBL_CUSTOMIZATION)
    w.el(root, "cbc:ProfileID", UBL_PROFILE)
    w.el(root, "cbc:ID", inv.number)
    w.el(root, "cbc:IssueDate", inv.issue_date.isoformat())
    if inv.due_date and not credit:
        w.el(root, "cbc:DueDate", inv.due_date.isoformat())
    w.el(root, "cbc:CreditNoteTypeCode" if credit else "cbc:InvoiceTypeCode", inv.type_code)
    w.opt(root, "cbc:Note", inv.note)
    w.el(root, "cbc:DocumentCurrencyCode", currency)
    w.el(root, "cbc:BuyerReference", inv.buyer_reference)
    if inv.order_reference:
        w.el(w.el(root, "cac:OrderReference"), "cbc:ID", inv.order_reference)
    reference = w.el(root, "cac:AdditionalDocumentReference")
    w.el(reference, "cbc:ID", inv.number)
    w.el(reference, "cbc:DocumentDescription", "The document as PDF")
    w.el(w.el(reference, "cac:Attachment"), "cbc:EmbeddedDocumentBinaryObject",
         base64.b64encode(pdf).decode("ascii"), mimeCode="application/pdf", filename=pdf_name)
    _ubl_party(w, root, "cac:AccountingSupplierParty", inv.seller, with_contact=True)
    _ubl_party(w, root, "cac:AccountingCustomerParty", inv.buyer, with_contact=False)

    if inv.delivery_date or inv.delivery_country:
        delivery = w.el(root, "cac:Delivery")
        w.opt(delivery, "cbc:ActualDeliveryDate", inv.delivery_date.isoformat() if inv.delivery_date else None)
        if inv.delivery_country:
            location = w.el(w.el(delivery, "cac:DeliveryLocation"), "cac:Address")
            w.el(w.el(location, "cac:Country"), "cbc:IdentificationCode", inv.delivery_country)
    means = w.el(root, "cac:PaymentMeans")
    w.el(means, "cbc:PaymentMeansCode", inv.payment.means_code)
    if inv.due_date and credit:
        w.el(means, "cbc:PaymentDueDate", inv.due_date.isoformat())
    w.el(means, "cbc:PaymentID", inv.payment.reference)
    if inv.payment.iban:
        account = w.el(means, "cac:PayeeFinancialAccount")
        w.el(account, "cbc:ID", inv.payment.iban)
        if inv.payment.bic:
            w.el(w.el(account, "cac:FinancialInstitutionBranch"), "cbc:ID", inv.payment.bic)
    if inv.payment_terms:
        w.el(w.el(root, "cac:PaymentTerms"), "cbc:Note", inv.payment_terms)

    f = inv.figures
    tax_total = w.el(root, "cac:TaxTotal")
    w.el(tax_total, "cbc:TaxAmount", _amount(f.vat_total), currencyID=currency)
    for row in inv.taxes:
        subtotal = w.el(tax_total, "cac:TaxSubtotal")
        w.el(subtotal, "cbc:TaxableAmount", _amount(row.basis), currencyID=currency)
        w.el(subtotal, "cbc:TaxAmount", _amount(row.vat), currencyID=currency)
        _ubl_category(w, subtotal, "cac:TaxCategory", row.category, row.rate, with_reason=True)
    totals = w.el(root, "cac:LegalMonetaryTotal")
    w.el(totals, "cbc:LineExtensionAmount", _amount(f.line_total), currencyID=currency)
    w.el(totals, "cbc:TaxExclusiveAmount", _amount(f.total_excl_vat), currencyID=currency)
    w.el(totals, "cbc:TaxInclusiveAmount", _amount(f.total_incl_vat), currencyID=currency)
    if f.rounding:
        w.el(totals, "cbc:PayableRoundingAmount", _amount(f.rounding), currencyID=currency)
    w.el(totals, "cbc:PayableAmount", _amount(f.payable), currencyID=currency)

    for line, category in zip(f.lines, inv.line_categories, strict=True):
        node = w.el(root, "cac:CreditNoteLine" if credit else "cac:InvoiceLine")
        w.el(node, "cbc:ID", str(line.line_nbr))
        w.el(node, "cbc:CreditedQuantity" if credit else "cbc:InvoicedQuantity", _plain(line.quantity),
             unitCode=UNIT_CODE)
        w.el(node, "cbc:LineExtensionAmount", _amount(line.net), currencyID=currency)
        item = w.el(node, "cac:Item")
        w.el(item, "cbc:Name", line.description)
        _ubl_category(w, item, "cac:ClassifiedTaxCategory", category, line.vat_rate, with_reason=False)
        w.el(w.el(node, "cac:Price"), "cbc:PriceAmount", _price(line.unit_price), currencyID=currency)
    return _serialise(root)
