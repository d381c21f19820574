"""The seller's settings and the buyers' customer_address rows, checked as an e-invoice needs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from include.invoice_mailing.identifiers import buyer_problems, seller_problems, valid_kid
from include.invoice_mailing.render import payment_reference
from include.invoice_mailing.rules import CustomerAddress

COMPANY = json.loads((Path(__file__).parents[1] / "include" / "templates" / "company.json").read_text("utf-8"))
BUYER = CustomerAddress("10050", "NO", street="Kaigaten 4", postal_code="5015", city="Bergen",
                        org_number="923456783", vat_number="NO923456783MVA", peppol_id="0192:923456783")


def test_the_shipped_company_settings_are_valid_for_e_invoices():
    assert seller_problems(COMPANY) == []


@pytest.mark.parametrize("key, value, words", [
    ("org_number", "923456784", "check digit is wrong"),
    ("vat_number", "NO923456784MVA", "check digit is wrong"),
    ("vat_number", "NO 974 760 673 MVA", "does not match org_number"),  # valid, but another company's
    ("iban", "NO17 1503 1234 503", "check digit is wrong"),
    ("bank_account", "1503.12.34504", "check digit is wrong"),
    ("bank_account", "8601.11.17947", "is not the IBAN of bank_account '8601.11.17947'"),  # another valid account
    ("bic", "DNBANO", "wrong number of digits"),
    ("country_code", "NOR", "not an ISO 3166-1 alpha-2"),
])
def test_a_broken_seller_setting_is_named_with_what_is_wrong(key, value, words):
    [(column, problem)] = seller_problems({**COMPANY, key: value})
    assert problem.startswith("company.json ") and value in problem and words in problem
    assert column == ("iban" if "is not the IBAN of" in words else key)


@pytest.mark.parametrize("key", ["vat_number", "iban", "street", "org_number"])
def test_a_missing_seller_setting_that_e_invoices_need_is_named(key):
    company = {k: v for k, v in COMPANY.items() if k != key}
    assert (key, f"company.json has no {key}: e-invoices must name it.") in seller_problems(company)


def test_a_seller_outside_norway_is_checked_by_the_rules_of_any_country():
    german = {**COMPANY, "country_code": "DE", "org_number": "HRB 12345", "vat_number": "DE136695976",
              "iban": "DE89 3704 0044 0532 0130 00", "bic": "COBADEFFXXX", "bank_account": "0532013000"}
    assert seller_problems(german) == []
    [(column, problem)] = seller_problems({**german, "vat_number": "DE136695977"})
    assert column == "vat_number" and problem.startswith("company.json vat_number 'DE136695977' is not a valid VAT number")


def test_a_valid_buyer_address_has_no_problems():
    assert buyer_problems(BUYER) == []
    assert buyer_problems(CustomerAddress("10051", "DE", vat_number="DE136695976",
                                          peppol_id="9930:DE136695976")) == []
    assert buyer_problems(CustomerAddress("10052", "SE", org_number="556036-0793", peppol_id="0007:5560360793")) == []


@pytest.mark.parametrize("column, value, words", [
    ("country_code", "XX", "'XX' is not an ISO 3166-1 alpha-2 country code"),
    ("org_number", "923456784", "'923456784' is not a valid Norwegian organisation number: its check digit"),
    ("vat_number", "NO923456784MVA", "'NO923456784MVA' is not a valid Norwegian VAT number"),
    ("vat_number", "DE136695977", "'DE136695977' is not a valid VAT number with its country prefix"),
    ("vat_number", "136695976", "'136695976' is not a valid VAT number with its country prefix"),
    ("peppol_id", "0192:923456784", "'0192:923456784' is not a valid Norwegian organisation number after scheme"),
    ("peppol_id", "0088:7080000000001", "'0088:7080000000001' is not a valid GLN"),
    ("peppol_id", "9925:BE0403170702", "'9925:BE0403170702' is not a valid VAT number"),
    ("peppol_id", "923456783", "'923456783' is not an electronic address: it is written scheme:value"),
    ("peppol_id", "1234:923456783", "scheme 1234, which is not in the EN 16931 electronic address scheme list"),
])
def test_a_broken_buyer_column_is_named_with_its_value(column, value, words):
    [(named, problem)] = buyer_problems(CustomerAddress(**{**BUYER.__dict__, column: value}))
    assert named == column
    assert problem.startswith(f"customer_address.{column} of customer 10050 ") and words in problem


def test_an_org_number_outside_norway_is_not_held_to_the_norwegian_check_digit():
    assert buyer_problems(CustomerAddress("10053", "GB", org_number="SC123456")) == []


@pytest.mark.parametrize("value, valid", [
    ("100010001012", True),   # MOD10 (Luhn), what payment_reference makes
    ("100010001018", True),   # MOD11
    ("1009-", True),          # MOD11 with the remainder 10
    ("100010001013", False),
    ("1009", False),
    ("12 34", False),
    ("", False),
])
def test_a_kid_is_valid_with_a_mod10_or_a_mod11_check_digit(value, valid):
    assert valid_kid(value) is valid


@pytest.mark.parametrize("locale", ["nb_NO", "sv_SE", "da_DK", "en_GB"])
def test_every_payment_reference_outside_finland_is_a_valid_kid(locale):
    assert all(valid_kid(payment_reference(f"{customer}", f"INV{number:06d}", locale))
               for customer in range(10001, 10060) for number in range(101, 140))


def test_the_finnish_reference_keeps_its_7_3_1_check_digit():
    assert payment_reference("10031", "INV000101", "fi_FI") == "100310001013"
