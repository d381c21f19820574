"""The business rules of rules 2 to 5 of docs/rules.md as pure functions: ERP values in, decisions with reasons out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

from email_validator import EmailNotValidError, validate_email

FORMATS = ("PDF", "HTML", "FACTURX", "EHF")
E_INVOICE_FORMATS = ("FACTURX", "EHF")  # carry the invoice as EN 16931 data (docs/rules.md, rule 5)
ADD_TO_STRENGTH = {"To": 0, "Cc": 1, "Bcc": 2}
_ADD_TO_BY_FOLDED = {field.casefold(): field for field in ADD_TO_STRENGTH}
DOC_TYPES = {"INV": "Invoice", "CRM": "Credit note", "DRM": "Debit note"}

# Reason codes, as written to the ledger.
CUSTOMER_INACTIVE = "customer_inactive"
CUSTOMER_ON_HOLD = "customer_on_hold"
EMAIL_DISABLED = "email_disabled"
NO_MAILING = "no_mailing"
MAILING_INACTIVE = "mailing_inactive"
CONFIG_ERROR = "config_error"
NO_ADDRESS = "no_address"
INVALID_ADDRESS = "invalid_address"
CONTACT_INACTIVE = "contact_inactive"
FOREIGN_CONTACT = "foreign_contact"
NO_RECIPIENTS = "no_recipients"
NO_LONGER_DUE = "no_longer_due"
ADDRESS_BOUNCED = "address_bounced"  # the address hard-bounced (docs/rules.md, rule 9): decided with the ledger
RELEASED_STATUSES = ("Open", "Closed")


# --- ERP values -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contact:
    contact_id: int
    customer_id: str | None
    display_name: str
    email: str | None
    preferred_format: str | None = None
    is_employee: bool = False
    active: bool = True


@dataclass(frozen=True)
class Customer:
    customer_id: str
    name: str
    class_id: str
    status: str = "Active"
    locale: str = "en_GB"
    email: str | None = None
    primary_contact_id: int | None = None
    invoice_contact_id: int | None = None
    send_invoices_by_email: bool = True


@dataclass(frozen=True)
class CustomerAddress:
    """The customer's legal and postal details (``customer_address``), which e-invoices need; optional."""

    customer_id: str
    country_code: str
    street: str | None = None
    postal_code: str | None = None
    city: str | None = None
    org_number: str | None = None
    vat_number: str | None = None
    peppol_id: str | None = None


@dataclass(frozen=True)
class RecipientRow:
    recipient_id: int
    setting_id: int
    contact_type: str
    contact_id: int | None = None
    format: str | None = None
    add_to: str = "To"
    active: bool = True


@dataclass(frozen=True)
class MailingSetting:
    setting_id: int
    class_id: str | None
    customer_id: str | None
    mailing_id: str
    email_account_id: int | None
    report_id: str | None
    template_id: str | None
    format: str = "PDF"
    active: bool = True
    recipients: tuple[RecipientRow, ...] = ()

    @property
    def owner(self) -> str:
        return f"customer {self.customer_id}" if self.customer_id else f"class {self.class_id}"


@dataclass(frozen=True)
class EmailAccount:
    account_id: int
    address: str
    display_name: str | None = None
    smtp_conn_id: str | None = None


@dataclass(frozen=True)
class Report:
    report_id: str
    description: str
    template_name: str


@dataclass(frozen=True)
class NotificationTemplate:
    template_id: str
    locale: str
    subject: str
    body_html: str


@dataclass(frozen=True)
class DocumentLine:
    line_nbr: int
    description: str
    quantity: Decimal
    unit_price: Decimal
    vat_rate: Decimal
    amount: Decimal


@dataclass(frozen=True)
class Document:
    doc_type: str
    ref_nbr: str
    customer_id: str
    status: str
    doc_date: date
    due_date: date | None
    currency: str
    amount: Decimal
    vat_amount: Decimal
    description: str | None = None
    customer_ref: str | None = None
    lines: tuple[DocumentLine, ...] = ()
    released_at: datetime | None = None
    dont_email: bool = False
    emailed: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.doc_type, self.ref_nbr)


# --- Decisions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """Why something is not sent: a ledger reason code and a sentence for the auditor."""

    reason: str
    detail: str
    status: str = "skipped"  # or "failed" for configuration errors


@dataclass(frozen=True)
class Recipient:
    """One address that gets the document, in one header field and one format."""

    address: str  # as the ERP wrote it: what the ledger and the log show
    add_to: str
    format: str
    name: str | None = None
    key: str = ""  # the normalised address, case-folded: one delivery per key, whatever the spelling


@dataclass(frozen=True)
class RecipientRefusal:
    """A recipient row that resolves to no usable address, or to an unusable format."""

    recipient: str  # the address if there is one, else what the row names ("Invoicing", "contact 17")
    refusal: Refusal
    format: str = ""


@dataclass(frozen=True)
class EffectiveMailing:
    setting: MailingSetting
    recipients: tuple[RecipientRow, ...]
    account: EmailAccount
    report: Report
    template_id: str


@dataclass
class DocumentPlan:
    """What to do with one document: refuse it whole, or mail these recipients."""

    document: Document
    refusal: Refusal | None = None
    mailing: EffectiveMailing | None = None
    recipients: list[Recipient] = field(default_factory=list)
    refused_recipients: list[RecipientRefusal] = field(default_factory=list)
    note: str | None = None  # kept with its deliveries for the audit (e.g. the buyer's address missing)

    def formats(self) -> list[str]:
        return sorted({r.format for r in self.recipients})


# --- 2. The customer gate ---------------------------------------------------------------------

def customer_gate(customer: Customer) -> Refusal | None:
    """Active and CreditHold customers get invoices by email when the customer allows email."""
    status = customer.status
    if status == "OnHold":
        return Refusal(CUSTOMER_ON_HOLD, f"customer {customer.customer_id} is on hold")
    if status not in ("Active", "CreditHold"):
        return Refusal(CUSTOMER_INACTIVE, f"customer {customer.customer_id} has status {status!r}")
    if not customer.send_invoices_by_email:
        return Refusal(EMAIL_DISABLED, f"customer {customer.customer_id} does not get invoices by email")
    return None


# --- 3. The effective mailing -----------------------------------------------------------------

def effective_mailing(
    customer: Customer,
    customer_setting: MailingSetting | None,
    class_setting: MailingSetting | None,
    accounts: dict[int, EmailAccount],
    reports: dict[str, Report],
    template_ids: set[str],
) -> EffectiveMailing | Refusal:
    """The customer's own row wins over its class's; recipients are inherited only when it has none."""
    setting = customer_setting or class_setting
    if setting is None:
        return Refusal(NO_MAILING, f"no INVOICE mailing for customer {customer.customer_id} "
                                   f"or its class {customer.class_id}")
    if not setting.active:
        return Refusal(MAILING_INACTIVE, f"the INVOICE mailing of {setting.owner} is not active")
    recipients = setting.recipients
    if customer_setting is not None and not recipients and class_setting is not None:
        recipients = class_setting.recipients

    where = f"mailing setting {setting.setting_id} ({setting.owner})"
    if setting.email_account_id is None or setting.email_account_id not in accounts:
        missing = "has no email account" if setting.email_account_id is None else \
            f"names email account {setting.email_account_id}, which does not exist"
        return Refusal(CONFIG_ERROR, f"{where} {missing}", "failed")
    try:
        normalize_address(accounts[setting.email_account_id].address)
    except EmailNotValidError as exc:
        return Refusal(CONFIG_ERROR, f"{where}: email account {setting.email_account_id} has no valid sender "
                                     f"address ({exc})", "failed")
    if not setting.report_id or setting.report_id not in reports:
        missing = "has no report" if not setting.report_id else \
            f"names report {setting.report_id!r}, which does not exist"
        return Refusal(CONFIG_ERROR, f"{where} {missing}", "failed")
    if not setting.template_id or setting.template_id not in template_ids:
        missing = "has no notification template" if not setting.template_id else \
            f"names notification template {setting.template_id!r}, which does not exist"
        return Refusal(CONFIG_ERROR, f"{where} {missing}", "failed")
    return EffectiveMailing(
        setting=setting,
        recipients=recipients,
        account=accounts[setting.email_account_id],
        report=reports[setting.report_id],
        template_id=setting.template_id,
    )


# --- 4. Recipients and 5. formats -------------------------------------------------------------

def normalize_address(raw: str | None) -> str:
    """A valid mailbox address in its normal form, or EmailNotValidError.

    Internationalised domains are allowed; CR, LF, commas and display names are not, so an ERP field
    can never smuggle a header or a second recipient into a message.
    """
    if raw is None or not raw.strip():
        raise EmailNotValidError("empty")
    return validate_email(raw.strip(), check_deliverability=False, allow_display_name=False).normalized


def resolve_contact(row: RecipientRow, customer: Customer, contacts: dict[int, Contact]):
    """The contact or raw address a recipient row points at: (contact | None, address | None) or a Refusal."""
    kind = row.contact_type
    if kind == "Customer":
        return None, customer.email
    if kind in ("Invoicing", "Primary"):
        contact_id = customer.invoice_contact_id if kind == "Invoicing" else customer.primary_contact_id
        label = f"{kind} contact of customer {customer.customer_id}"
    elif kind in ("Contact", "Employee"):
        contact_id = row.contact_id
        label = f"{kind} {contact_id}"
    else:
        return Refusal(CONFIG_ERROR, f"recipient row {row.recipient_id} has unknown contact type {kind!r}",
                       "failed")
    found = contacts.get(contact_id) if contact_id is not None else None
    if found is None:
        return Refusal(NO_ADDRESS, f"{label} is not set or does not exist")
    if kind == "Employee" and not found.is_employee:
        return Refusal(FOREIGN_CONTACT, f"contact {found.contact_id} is not an employee")
    if kind != "Employee" and found.customer_id != customer.customer_id:
        return Refusal(FOREIGN_CONTACT, f"contact {found.contact_id} belongs to customer {found.customer_id}")
    if not found.active:
        return Refusal(CONTACT_INACTIVE, f"contact {found.contact_id} is inactive")
    return found, found.email


def choose_format(row: RecipientRow, contact: Contact | None, setting: MailingSetting) -> str | Refusal:
    """The first format that is set: the recipient row's, the contact's preference, the mailing's."""
    for source, value in (("recipient row", row.format), ("contact", contact and contact.preferred_format),
                          ("mailing", setting.format)):
        if value is not None and str(value).strip():
            value = str(value).strip().upper()
            if value in FORMATS:
                return value
            return Refusal(CONFIG_ERROR, f"the {source} asks for format {value!r}; known are {', '.join(FORMATS)}",
                           "failed")
    return "PDF"


def resolve_recipients(
    mailing: EffectiveMailing, customer: Customer, contacts: dict[int, Contact]
) -> tuple[list[Recipient], list[RecipientRefusal]]:
    """Resolve every active recipient row; same address (any case) once, in the strongest field."""
    chosen: dict[str, Recipient] = {}
    refused: list[RecipientRefusal] = []
    for row in mailing.recipients:
        if not row.active:
            continue
        resolved = resolve_contact(row, customer, contacts)
        if isinstance(resolved, Refusal):
            refused.append(RecipientRefusal(_row_label(row), resolved))
            continue
        found, raw = resolved
        if raw is None or not str(raw).strip():
            refused.append(RecipientRefusal(_row_label(row), Refusal(NO_ADDRESS, f"{_row_label(row)} has no email")))
            continue
        address = str(raw).strip()
        try:
            key = normalize_address(raw).casefold()
        except EmailNotValidError as exc:
            refused.append(RecipientRefusal(_printable(raw), Refusal(INVALID_ADDRESS, f"{_row_label(row)}: {exc}")))
            continue
        fmt = choose_format(row, found, mailing.setting)
        if isinstance(fmt, Refusal):
            refused.append(RecipientRefusal(address, fmt))
            continue
        add_to = _ADD_TO_BY_FOLDED.get(str(row.add_to or "").strip().casefold())
        if add_to is None:  # guessing could turn a hidden Bcc into a visible To
            refused.append(RecipientRefusal(address, Refusal(
                CONFIG_ERROR, f"recipient row {row.recipient_id} has add_to {row.add_to!r}; known are To, Cc, Bcc",
                "failed")))
            continue
        name = found.display_name if found is not None else customer.name
        current = chosen.get(key)
        if current is None or ADD_TO_STRENGTH[add_to] < ADD_TO_STRENGTH[current.add_to]:
            chosen[key] = Recipient(address=address, add_to=add_to, format=fmt, name=name, key=key)
    return list(chosen.values()), refused


def _row_label(row: RecipientRow) -> str:
    if row.contact_type in ("Contact", "Employee"):
        return f"{row.contact_type} {row.contact_id}"
    return row.contact_type


def _printable(value: str) -> str:
    """ERP text made safe for a ledger key: one line, bounded."""
    return " ".join(str(value).split())[:254]


# --- Still due? (docs/rules.md, rule 1, as the ERP has it now) ------------------------------------------

def still_due(document: Document, *, include_emailed: bool = False) -> Refusal | None:
    """Re-check rule 1 (docs/rules.md) at sending time: the ERP may have changed since the night's extract
    (a document voided, marked "don't email", or emailed by hand). None if it is still due."""
    if document.status not in RELEASED_STATUSES or document.released_at is None:
        why = f"its status is now {document.status}"
    elif document.dont_email:
        why = "it is now marked don't email"
    elif document.emailed and not include_emailed:
        why = "it is now marked as emailed"
    else:
        return None
    return Refusal(NO_LONGER_DUE, f"{document.doc_type} {document.ref_nbr} is no longer due: {why}")


# --- One document -----------------------------------------------------------------------------

def plan_document(
    document: Document,
    customer: Customer | None,
    customer_setting: MailingSetting | None,
    class_setting: MailingSetting | None,
    contacts: dict[int, Contact],
    accounts: dict[int, EmailAccount],
    reports: dict[str, Report],
    template_ids: set[str],
) -> DocumentPlan:
    plan = DocumentPlan(document)
    if customer is None:
        plan.refusal = Refusal(CONFIG_ERROR, f"customer {document.customer_id} does not exist", "failed")
        return plan
    plan.refusal = customer_gate(customer)
    if plan.refusal:
        return plan
    mailing = effective_mailing(customer, customer_setting, class_setting, accounts, reports, template_ids)
    if isinstance(mailing, Refusal):
        plan.refusal = mailing
        return plan
    plan.mailing = mailing
    plan.recipients, plan.refused_recipients = resolve_recipients(mailing, customer, contacts)
    if not plan.recipients:
        plan.refusal = Refusal(NO_RECIPIENTS, f"the mailing of {mailing.setting.owner} leaves no valid recipient")
    return plan
