"""The invoice-mailing business rules (spec sections 2 to 5), one test per rule or edge case."""

from datetime import date
from decimal import Decimal
from itertools import count

import pytest
from email_validator import EmailNotValidError

from include.invoice_mailing.rules import (
    CONFIG_ERROR,
    CONTACT_INACTIVE,
    CUSTOMER_INACTIVE,
    CUSTOMER_ON_HOLD,
    EMAIL_DISABLED,
    FOREIGN_CONTACT,
    INVALID_ADDRESS,
    MAILING_INACTIVE,
    NO_ADDRESS,
    NO_MAILING,
    NO_RECIPIENTS,
    Contact,
    Customer,
    Document,
    EffectiveMailing,
    EmailAccount,
    MailingSetting,
    RecipientRow,
    Refusal,
    Report,
    customer_gate,
    effective_mailing,
    normalize_address,
    plan_document,
    resolve_recipients,
)

# --- A tiny ERP -------------------------------------------------------------------------------

ACCOUNTS = {1: EmailAccount(1, "billing@firm.no"), 2: EmailAccount(2, "export@firm.no")}
REPORTS = {"AR641000": Report("AR641000", "Invoice/memo", "invoice")}
TEMPLATES = {"InvoiceNotification"}
DOC = Document("INV", "000123", "C1", "Open", date(2024, 5, 2), date(2024, 6, 1), "NOK",
               Decimal("1250.00"), Decimal("250.00"))
_ids = count(100)


def contact(contact_id, email, customer_id="C1", **kw) -> Contact:
    return Contact(contact_id, customer_id, f"Contact {contact_id}", email, **kw)


CONTACTS = {c.contact_id: c for c in (
    contact(10, "faktura@bolgen.no"),                          # the customer's invoice contact
    contact(11, "leder@bolgen.no"),                            # its primary contact
    contact(12, "ola@bolgen.no"),                              # another contact of the customer
    contact(13, "gammel@bolgen.no", active=False),
    contact(14, None),
    contact(15, "ola@"),
    contact(20, "selger@firm.no", customer_id=None, is_employee=True),
    contact(30, "kari@annen.no", customer_id="C2"),
)}


def customer(**kw) -> Customer:
    base = dict(customer_id="C1", name="Bølgen AS", class_id="DOMESTIC", email="post@bolgen.no",
                primary_contact_id=11, invoice_contact_id=10)
    return Customer(**{**base, **kw})


def row(contact_type="Invoicing", contact_id=None, **kw) -> RecipientRow:
    return RecipientRow(next(_ids), 1, contact_type, contact_id, **kw)


def setting(*rows, setting_id=1, customer_id=None, **kw) -> MailingSetting:
    base = dict(setting_id=setting_id, class_id=None if customer_id else "DOMESTIC", customer_id=customer_id,
                mailing_id="INVOICE", email_account_id=1, report_id="AR641000", template_id="InvoiceNotification")
    return MailingSetting(**{**base, **kw}, recipients=tuple(rows))


def mailing(customer_setting=None, class_setting=None, cust=None) -> EffectiveMailing | Refusal:
    return effective_mailing(cust or customer(), customer_setting, class_setting, ACCOUNTS, REPORTS, TEMPLATES)


def resolve(*rows, cust=None, contacts=CONTACTS, **setting_kw):
    """Who gets it ({address: (field, format)}) and who does not ({recipient: reason})."""
    sent, refused = resolve_recipients(mailing(class_setting=setting(*rows, **setting_kw)), cust or customer(),
                                       contacts)
    return {r.address: (r.add_to, r.format) for r in sent}, {r.recipient: r.refusal.reason for r in refused}


def plan(cust="default", customer_setting=None, class_setting=None, contacts=CONTACTS):
    cust = customer() if cust == "default" else cust
    return plan_document(DOC, cust, customer_setting, class_setting, contacts, ACCOUNTS, REPORTS, TEMPLATES)


# --- 2. The customer gate ---------------------------------------------------------------------

@pytest.mark.parametrize("status, by_email, reason", [
    ("Active", True, None),
    ("CreditHold", True, None),
    ("OnHold", True, CUSTOMER_ON_HOLD),
    ("Inactive", True, CUSTOMER_INACTIVE),
    ("OneTime", True, CUSTOMER_INACTIVE),
    ("Active", False, EMAIL_DISABLED),
    ("CreditHold", False, EMAIL_DISABLED),
])
def test_customer_gate_lets_only_active_and_credit_hold_customers_with_email_through(status, by_email, reason):
    refusal = customer_gate(customer(status=status, send_invoices_by_email=by_email))
    assert (refusal and refusal.reason) == reason
    assert refusal is None or (refusal.status == "skipped" and "C1" in refusal.detail)


def test_credit_hold_customer_still_gets_invoices():
    p = plan(customer(status="CreditHold"), class_setting=setting(row("Invoicing")))
    assert p.refusal is None
    assert [r.address for r in p.recipients] == ["faktura@bolgen.no"]


# --- 3. The effective mailing -----------------------------------------------------------------

def test_customer_mailing_row_overrides_class_row():
    own = setting(row("Primary"), setting_id=2, customer_id="C1", email_account_id=2, format="HTML")
    m = mailing(own, setting(row("Invoicing")))
    assert (m.setting.setting_id, m.account.address) == (2, "export@firm.no")
    assert [r.contact_type for r in m.recipients] == ["Primary"]


def test_class_mailing_row_is_used_when_customer_has_none():
    m = mailing(None, setting(row("Invoicing"), setting_id=7))
    assert m.setting.setting_id == 7 and m.account.account_id == 1 and m.template_id == "InvoiceNotification"


def test_no_mailing_row_is_skipped_no_mailing():
    assert (mailing(None, None).reason, mailing(None, None).status) == (NO_MAILING, "skipped")


@pytest.mark.parametrize("own_active, class_active", [(False, True), (True, False)], ids=["customer", "class"])
def test_inactive_effective_mailing_row_is_skipped_mailing_inactive(own_active, class_active):
    own = setting(row(), setting_id=2, customer_id="C1", active=False) if not own_active else None
    refusal = mailing(own, setting(row(), active=class_active))
    assert (refusal.reason, refusal.status) == (MAILING_INACTIVE, "skipped")  # no fallback to the class row


@pytest.mark.parametrize("change, missing", [
    ({"email_account_id": None}, "no email account"),
    ({"email_account_id": 9}, "email account 9"),
    ({"report_id": None}, "no report"),
    ({"report_id": "AR999999"}, "report 'AR999999'"),
    ({"template_id": None}, "no notification template"),
    ({"template_id": "Nope"}, "notification template 'Nope'"),
])
def test_missing_account_report_or_template_is_config_error_naming_setting_and_what_is_missing(change, missing):
    refusal = mailing(None, setting(row(), setting_id=7, **change))
    assert (refusal.reason, refusal.status) == (CONFIG_ERROR, "failed")
    assert "mailing setting 7" in refusal.detail and missing in refusal.detail


def test_customer_row_with_recipients_replaces_class_recipients():
    own = setting(row("Contact", 12), setting_id=2, customer_id="C1")
    p = plan(customer_setting=own, class_setting=setting(row("Invoicing"), row("Primary")))
    assert [r.address for r in p.recipients] == ["ola@bolgen.no"]


def test_customer_row_without_recipients_inherits_class_recipients_but_keeps_own_format_and_account():
    own = setting(setting_id=2, customer_id="C1", email_account_id=2, format="HTML")
    p = plan(customer_setting=own, class_setting=setting(row("Invoicing"), format="PDF"))
    assert p.mailing.account.address == "export@firm.no"
    assert [(r.address, r.format) for r in p.recipients] == [("faktura@bolgen.no", "HTML")]


# --- 4. Recipients ----------------------------------------------------------------------------

@pytest.mark.parametrize("recipient_row, address", [
    (row("Invoicing"), "faktura@bolgen.no"),
    (row("Primary"), "leder@bolgen.no"),
    (row("Contact", 12), "ola@bolgen.no"),
    (row("Employee", 20), "selger@firm.no"),
    (row("Customer"), "post@bolgen.no"),
])
def test_contact_type_resolves_to_its_address(recipient_row, address):
    assert resolve(recipient_row) == ({address: ("To", "PDF")}, {})


@pytest.mark.parametrize("bad_row, cust_kw, label, reason", [
    (row("Contact", 30), {}, "Contact 30", FOREIGN_CONTACT),            # contact of another customer
    (row("Employee", 12), {}, "Employee 12", FOREIGN_CONTACT),          # employee must be an employee
    (row("Contact", 20), {}, "Contact 20", FOREIGN_CONTACT),            # an employee is no customer contact
    (row("Contact", 13), {}, "Contact 13", CONTACT_INACTIVE),
    (row("Invoicing"), {"invoice_contact_id": 13}, "Invoicing", CONTACT_INACTIVE),
    (row("Invoicing"), {"invoice_contact_id": 30}, "Invoicing", FOREIGN_CONTACT),
    (row("Contact", 99), {}, "Contact 99", NO_ADDRESS),                 # contact does not exist
    (row("Invoicing"), {"invoice_contact_id": None}, "Invoicing", NO_ADDRESS),
    (row("Contact", 14), {}, "Contact 14", NO_ADDRESS),                 # contact without email
    (row("Customer"), {"email": "   "}, "Customer", NO_ADDRESS),
    (row("Contact", 15), {}, "ola@", INVALID_ADDRESS),
])
def test_unusable_recipient_row_is_skipped_while_others_still_get_it(bad_row, cust_kw, label, reason):
    sent, refused = resolve(bad_row, row("Primary"), cust=customer(**cust_kw))
    assert sent == {"leder@bolgen.no": ("To", "PDF")}
    assert refused == {label: reason}


def test_unknown_contact_type_is_a_config_error_for_that_row():
    _, refused = resolve_recipients(mailing(class_setting=setting(row("Vendor"), row("Primary"))), customer(),
                                    CONTACTS)
    assert [(r.recipient, r.refusal.reason, r.refusal.status) for r in refused] == [("Vendor", CONFIG_ERROR, "failed")]
    assert "'Vendor'" in refused[0].refusal.detail


def test_inactive_recipient_row_is_ignored():
    assert resolve(row("Contact", 30, active=False), row("Employee", 20, active=False), row("Primary")) == \
        ({"leder@bolgen.no": ("To", "PDF")}, {})


@pytest.mark.parametrize("raw", [
    "ola@", "a b@x.no", "a@x.no\r\nBcc: evil@x.no", "a@x.no\nevil@x.no", "a@x.no, b@x.no", "a@x.no;b@x.no",
    "Ola <a@x.no>", '"a,b"@x.no', "", "  ", None,
])
def test_invalid_or_multiple_addresses_are_refused(raw):
    with pytest.raises(EmailNotValidError):
        normalize_address(raw)


@pytest.mark.parametrize("raw, normal", [
    ("post@bølgen.no", "post@bølgen.no"),
    ("post@xn--blgen-vua.no", "post@bølgen.no"),
    ("ola+faktura@bolgen.no", "ola+faktura@bolgen.no"),
    ("Ola.Nordmann@Bolgen.NO", "Ola.Nordmann@bolgen.no"),
])
def test_valid_addresses_including_idn_and_plus_are_accepted(raw, normal):
    assert normalize_address(raw) == normal


@pytest.mark.parametrize("raw", ["a@x.no\r\nBcc: evil@x.no", "a@x.no, evil@x.no", "a@x.no\nTo: evil@x.no"])
def test_erp_address_can_never_add_a_recipient_or_header(raw):
    p = plan(customer(email=raw), class_setting=setting(row("Customer"), row("Invoicing")))
    assert [r.address for r in p.recipients] == ["faktura@bolgen.no"]
    [refused] = p.refused_recipients
    assert refused.refusal.reason == INVALID_ADDRESS
    assert "\r" not in refused.recipient and "\n" not in refused.recipient


@pytest.mark.parametrize("first, second, field", [
    ("Bcc", "To", "To"), ("To", "Bcc", "To"), ("Cc", "To", "To"), ("Bcc", "Cc", "Cc"), ("Cc", "Cc", "Cc"),
])
def test_same_address_in_several_rows_is_mailed_once_in_the_strongest_field(first, second, field):
    cust = customer(email="FAKTURA@Bolgen.no")  # the invoice contact's address, in another case
    sent, refused = resolve(row("Customer", add_to=first), row("Invoicing", add_to=second), cust=cust)
    assert list(sent.values()) == [(field, "PDF")] and refused == {}


def test_same_address_in_to_and_bcc_is_mailed_once_in_to():
    sent, _ = resolve(row("Contact", 12, add_to="Bcc"), row("Contact", 12, add_to="To"), row("Primary", add_to="Cc"))
    assert sent == {"ola@bolgen.no": ("To", "PDF"), "leder@bolgen.no": ("Cc", "PDF")}


def test_document_without_valid_recipient_is_skipped_no_recipients():
    p = plan(class_setting=setting(row("Contact", 30), row("Contact", 15), row("Primary", active=False)))
    assert (p.refusal.reason, p.refusal.status, p.recipients) == (NO_RECIPIENTS, "skipped", [])
    assert sorted(r.refusal.reason for r in p.refused_recipients) == [FOREIGN_CONTACT, INVALID_ADDRESS]


# --- 5. Formats -------------------------------------------------------------------------------

@pytest.mark.parametrize("row_format, preference, mailing_format, expected", [
    ("HTML", "PDF", "PDF", "HTML"),   # the recipient row wins
    (None, "HTML", "PDF", "HTML"),    # then the contact's preference
    (None, None, "HTML", "HTML"),     # then the mailing
    (" ", "", "HTML", "HTML"),        # blank values are not set
    ("html", None, "PDF", "HTML"),
])
def test_format_is_first_set_of_row_contact_mailing(row_format, preference, mailing_format, expected):
    contacts = {**CONTACTS, 12: contact(12, "ola@bolgen.no", preferred_format=preference)}
    sent, _ = resolve(row("Contact", 12, format=row_format), contacts=contacts, format=mailing_format)
    assert sent == {"ola@bolgen.no": ("To", expected)}


def test_contact_preference_overrides_mailing_format():
    contacts = {**CONTACTS, 10: contact(10, "faktura@bolgen.no", preferred_format="HTML")}
    sent, _ = resolve(row("Invoicing"), row("Primary"), contacts=contacts, format="PDF")
    assert sent == {"faktura@bolgen.no": ("To", "HTML"), "leder@bolgen.no": ("To", "PDF")}


@pytest.mark.parametrize("row_format, preference, mailing_format", [
    ("DOCX", None, "PDF"), (None, "DOCX", "PDF"), (None, None, "DOCX"),
], ids=["row", "contact", "mailing"])
def test_unknown_format_is_config_error_for_that_recipient_while_others_still_get_it(row_format, preference,
                                                                                      mailing_format):
    contacts = {**CONTACTS, 10: contact(10, "faktura@bolgen.no", preferred_format=preference)}
    rows = row("Invoicing", format=row_format), row("Primary", format="PDF")
    p = plan(class_setting=setting(*rows, format=mailing_format), contacts=contacts)
    assert p.refusal is None and [(r.address, r.format) for r in p.recipients] == [("leder@bolgen.no", "PDF")]
    [refused] = p.refused_recipients
    assert (refused.recipient, refused.refusal.reason, refused.refusal.status) == \
        ("faktura@bolgen.no", CONFIG_ERROR, "failed")
    assert "'DOCX'" in refused.refusal.detail


# --- plan_document end to end -----------------------------------------------------------------

@pytest.mark.parametrize("cust, class_setting, reason, status", [
    (None, setting(row()), CONFIG_ERROR, "failed"),                          # unknown customer
    (customer(status="OnHold"), setting(row()), CUSTOMER_ON_HOLD, "skipped"),
    (customer(status="Inactive"), setting(row()), CUSTOMER_INACTIVE, "skipped"),
    (customer(send_invoices_by_email=False), setting(row()), EMAIL_DISABLED, "skipped"),
    (customer(), None, NO_MAILING, "skipped"),
    (customer(), setting(row(), active=False), MAILING_INACTIVE, "skipped"),
    (customer(), setting(row(), report_id=None), CONFIG_ERROR, "failed"),
    (customer(), setting(), NO_RECIPIENTS, "skipped"),
])
def test_plan_refuses_document_with_reason(cust, class_setting, reason, status):
    p = plan(cust, class_setting=class_setting)
    assert (p.refusal.reason, p.refusal.status, p.recipients) == (reason, status, [])


def test_plan_lists_who_gets_the_document_in_which_field_and_format():
    own = setting(row("Invoicing"), row("Employee", 20, add_to="Bcc", format="HTML"), row("Customer", add_to="Cc"),
                  row("Contact", 30), setting_id=2, customer_id="C1")
    p = plan(customer_setting=own, class_setting=setting(row("Primary")))
    assert p.refusal is None
    assert [(r.address, r.add_to, r.format, r.name) for r in p.recipients] == [
        ("faktura@bolgen.no", "To", "PDF", "Contact 10"),
        ("selger@firm.no", "Bcc", "HTML", "Contact 20"),
        ("post@bolgen.no", "Cc", "PDF", "Bølgen AS"),
    ]
    assert p.formats() == ["HTML", "PDF"]
    assert [(r.recipient, r.refusal.reason) for r in p.refused_recipients] == [("Contact 30", FOREIGN_CONTACT)]


@pytest.mark.parametrize("written, field", [("To", "To"), ("cc", "Cc"), ("BCC", "Bcc"), (" Bcc ", "Bcc")])
def test_add_to_is_read_whatever_its_case(written, field):
    sent, refused = resolve(row("Invoicing", add_to=written))
    assert sent == {"faktura@bolgen.no": (field, "PDF")} and refused == {}


def test_unknown_add_to_is_a_config_error_never_a_visible_to():
    sent, refused = resolve(row("Invoicing", add_to="Hidden"), row("Primary"))
    assert list(sent.values()) == [("To", "PDF")]
    assert list(refused.values()) == [CONFIG_ERROR]


def test_an_email_account_without_a_valid_sender_address_is_a_config_error():
    accounts = {1: EmailAccount(1, "faktura@"), 2: ACCOUNTS[2]}
    refusal = effective_mailing(customer(), None, setting(row("Invoicing")), accounts, REPORTS, TEMPLATES)
    assert (refusal.reason, refusal.status) == (CONFIG_ERROR, "failed")
    assert "email account 1" in refusal.detail and "mailing setting 1" in refusal.detail
