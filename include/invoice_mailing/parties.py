"""The seller's and the buyer's blocks of a document, as the law of the seller's country asks for them.

Norway's bookkeeping regulation (bokføringsforskriften § 5-1-1) asks a sales document for the buyer's
name and address or organisation number, the organisation number followed by "MVA" where the party is
VAT-registered; a company in the register of business enterprises states "Foretaksregisteret" after its
number (foretaksregisterloven § 10-2). The buyer's details come from the ERP's optional
``customer_address``; the seller's from the company settings (``company.json``). A country is printed
only when the two parties are in different countries. Addresses follow the customer's locale: the
postal code before the town, as in the Nordics and the Netherlands, or after it, on its own line, as in
the United Kingdom.
"""

from __future__ import annotations

from babel.core import Locale, UnknownLocaleError
from stdnum.no import orgnr

from include.invoice_mailing.rules import CustomerAddress

POSTCODE_LAST = ("en_GB",)  # the town, then the postcode on its own line


def country_name(code: str | None, locale: str) -> str:
    """The country's name in the reader's language (``NO`` → "Norge" for nb_NO); the code when unknown."""
    if not code:
        return ""
    try:
        return Locale.parse(locale).territories.get(code.upper(), code.upper())
    except (UnknownLocaleError, ValueError):
        return code.upper()


def address_lines(street: str | None, postal_code: str | None, city: str | None, locale: str) -> list[str]:
    lines = [street] if street else []
    if locale in POSTCODE_LAST:
        lines += [part for part in (city, postal_code) if part]
    elif postal_code or city:
        lines.append(" ".join(part for part in (postal_code, city) if part))
    return lines


def registration(address: CustomerAddress) -> tuple[str, str] | None:
    """(label, number) of a business buyer: a Norwegian organisation number (with MVA when it has a VAT
    number), else its VAT number, else any organisation number; None for a consumer."""
    country = (address.country_code or "").upper()
    if address.org_number and country == "NO" and orgnr.is_valid(address.org_number):
        number = orgnr.format(address.org_number)
        return ("Org. no.", f"{number} MVA" if address.vat_number else number)
    if address.vat_number:
        return ("VAT no.", address.vat_number)
    if address.org_number:
        return ("Org. no.", address.org_number)
    return None


def buyer(address: CustomerAddress | None, locale: str, seller_country: str | None) -> dict:
    """What the buyer block prints below the name: address lines, and the registration, from customer_address."""
    if address is None:
        return {"known": False, "lines": [], "registration": None}
    lines = address_lines(address.street, address.postal_code, address.city, locale)
    if address.country_code and address.country_code.upper() != (seller_country or "").upper():
        lines.append(country_name(address.country_code, locale))
    return {"known": True, "lines": lines, "registration": registration(address)}


def seller(company: dict, locale: str, buyer_country: str | None) -> dict:
    """The seller's address lines (its country only for a buyer known to be abroad) and its register."""
    if company.get("street") or company.get("city"):
        lines = address_lines(company.get("street"), company.get("postal_code"), company.get("city"), locale)
        country = company.get("country_code")
        if buyer_country and country and buyer_country.upper() != country.upper():
            lines.append(country_name(country, locale))
    else:  # an older company.json: its address lines as they are
        lines = list(company.get("address") or ())
    return {"lines": lines, "register": company.get("register") or ""}
