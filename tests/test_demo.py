"""The demo ERP (``make demo``): its documents add up as an e-invoice checks them, and its e-invoice customers
choose their formats each of the ways the ERP allows."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from sqlalchemy import create_engine, select

from include.invoice_mailing import demo, source
from include.invoice_mailing.identifiers import buyer_problems
from include.invoice_mailing.rules import plan_document

CENT = Decimal("0.01")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    engine = create_engine(f"sqlite:///{tmp_path_factory.mktemp('demo') / 'erp.db'}")
    demo.seed(engine)
    with engine.connect() as conn:
        keys = [tuple(row) for row in conn.execute(select(source.invoice.c.doc_type, source.invoice.c.ref_nbr))]
    yield source.load_batch(engine, keys)
    engine.dispose()


def formats_of(batch, ref_nbr: str) -> dict[str, str]:
    """The demo document's recipients: address -> format, as the rules of spec section 5 choose them."""
    [document] = [d for d in batch.documents if d.ref_nbr == ref_nbr]
    customer_id = document.customer_id
    customer = batch.customers[customer_id]
    plan = plan_document(document, customer, batch.customer_settings.get(customer_id),
                         batch.class_settings.get(customer.class_id), batch.contacts, batch.accounts, batch.reports,
                         {template_id for template_id, _ in batch.templates})
    return {r.address.split("@")[1] if r.address.endswith("fjordlys.example") else r.address.split("@")[0]: r.format
            for r in plan.recipients}


def test_every_demo_line_is_its_quantity_times_its_unit_price_to_the_cent(batch):
    lines = [line for document in batch.documents for line in document.lines]
    assert len(lines) > 600
    assert [line for line in lines if line.amount != (line.quantity * line.unit_price).quantize(CENT, ROUND_HALF_UP)] \
        == []


def test_the_demo_vat_is_rounded_once_per_rate_on_the_document_as_en_16931_computes_it(batch):
    for document in batch.documents:
        basis: dict[Decimal, Decimal] = {}
        for line in document.lines:
            basis[line.vat_rate] = basis.get(line.vat_rate, Decimal(0)) + line.amount
        vat = sum(((b * rate / 100).quantize(CENT, ROUND_HALF_UP) for rate, b in basis.items()), Decimal(0))
        assert (document.vat_amount, document.amount) == (vat, sum(basis.values()) + vat), document.ref_nbr


def test_rounding_per_rate_is_not_rounding_per_line():
    # Three lines of 0.02 at 25 %: 0.005 each, 0.01 each rounded per line; 0.015, so 0.02, per rate.
    assert demo.vat_per_rate([(Decimal("0.02"), Decimal(25))] * 3) == Decimal("0.02")


def test_the_e_invoice_customers_choose_their_format_each_way_the_erp_allows(batch):
    assert batch.customer_settings["10047"].format == "EHF"          # the customer's mailing
    assert formats_of(batch, "INV000237") == {"bjorn.aasen": "EHF", "fjordlys.example": "PDF"}  # + the bookkeeper
    assert formats_of(batch, "INV000238") == {"solveig.haugland": "EHF", "fjordlys.example": "PDF"}  # a contact's
    assert formats_of(batch, "INV000239") == {"julia.weiss": "FACTURX", "info": "PDF"}  # a recipient row's
    assert batch.contacts[batch.customers["10049"].invoice_contact_id].preferred_format == "HTML"  # the row wins


def test_one_e_invoice_customer_has_no_customer_address_and_its_pdf_recipient_is_still_planned(batch):
    assert formats_of(batch, "INV000241") == {"siri.nordmann": "EHF", "fjordlys.example": "PDF"}
    assert "10050" not in batch.addresses


def test_the_demo_customer_addresses_are_valid_and_optional_for_pdf_customers(batch):
    assert {customer_id: buyer_problems(address) for customer_id, address in batch.addresses.items()} == {
        customer_id: [] for customer_id in ("10002", "10004", "10010", "10047", "10048", "10049")}
    assert len(batch.customers) - len(batch.addresses) == 44  # the rest mail PDF and HTML without one


def test_the_e_invoice_customers_documents_have_mixed_rates_with_zero_and_fractional_quantities(batch):
    documents = [d for d in batch.documents if d.customer_id in ("10047", "10048", "10049", "10050")]
    assert {d.doc_type for d in documents} == {"INV", "CRM", "DRM"}
    norwegian = {line.vat_rate for d in documents if d.currency == "NOK" for line in d.lines}
    assert norwegian == {Decimal(25), Decimal(15), Decimal(12), Decimal(0)}
    assert {line.vat_rate for d in documents if d.currency == "EUR" for line in d.lines} == {
        Decimal(19), Decimal(7), Decimal(0)}
    assert any(line.quantity != line.quantity.to_integral_value() for d in documents for line in d.lines)


def test_make_demo_shows_the_deliveries_per_format_and_each_failure_with_the_rule_that_failed():
    row = dict(customer_id="10050", ref_nbr="INV000241", reason=None, detail=None, last_error=None)
    deliveries = [{**row, "format": "EHF", "status": "failed", "reason": "config_error",
                   "detail": "e-invoice refused before sending: BR-11 (fatal): the buyer's country code is required, "
                             "and customer 10050 has no customer_address row; the other formats and recipients of "
                             "the document are unaffected"},
                  {**row, "format": "PDF", "status": "sent"}, {**row, "format": "FACTURX", "status": "sent"},
                  {**row, "format": "", "status": "skipped"}]
    assert demo.formats_sent(deliveries).splitlines()[3:] == [
        "  EHF            0      1", "  FACTURX        1      0", "  PDF            1      0"]
    failure = demo.failures(deliveries).splitlines()[2:]
    assert failure[0].startswith("  10050 INV000241 EHF config_error: e-invoice refused before sending: BR-11")
    assert all(len(line) <= 110 for line in failure) and all(line.startswith("      ") for line in failure[1:])
    # the reason whole, to its fix: nothing cut off (issue 30 found "customer 10050 ha…")
    assert " ".join(" ".join(failure).split()).endswith(
        "customer 10050 has no customer_address row; the other formats and recipients of the document are unaffected")
