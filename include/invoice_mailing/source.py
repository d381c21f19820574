"""Read due documents and mailing settings from the ERP database (SQLAlchemy Core, read-only)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    and_,
    inspect,
    or_,
    select,
    tuple_,
    update,
)

from include.invoice_mailing.rules import (
    RELEASED_STATUSES,
    Contact,
    Customer,
    CustomerAddress,
    Document,
    DocumentLine,
    EmailAccount,
    MailingSetting,
    NotificationTemplate,
    RecipientRow,
    Report,
)

DDL_PATH = Path(__file__).parent / "sql" / "erp_source.sql"

# The contract tables, declared once with just the columns the pipeline reads.
erp = MetaData()

customer_class = Table(
    "customer_class", erp,
    Column("class_id", String(10), primary_key=True),
    Column("description", String(60)),
)
email_account = Table(
    "email_account", erp,
    Column("account_id", Integer, primary_key=True),
    Column("address", String(254)),
    Column("display_name", String(100)),
    Column("smtp_conn_id", String(250)),
)
report = Table(
    "report", erp,
    Column("report_id", String(8), primary_key=True),
    Column("description", String(60)),
    Column("template_name", String(200)),
)
notification_template = Table(
    "notification_template", erp,
    Column("template_id", String(30), primary_key=True),
    Column("locale", String(10), primary_key=True),
    Column("subject", String(255)),
    Column("body_html", Text),
)
contact = Table(
    "contact", erp,
    Column("contact_id", Integer, primary_key=True),
    Column("customer_id", String(10)),
    Column("display_name", String(100)),
    Column("email", String(254)),
    Column("preferred_format", String(10)),
    Column("is_employee", Boolean),
    Column("active", Boolean),
)
customer = Table(
    "customer", erp,
    Column("customer_id", String(10), primary_key=True),
    Column("name", String(100)),
    Column("class_id", String(10)),
    Column("status", String(10)),
    Column("locale", String(10)),
    Column("email", String(254)),
    Column("primary_contact_id", Integer),
    Column("invoice_contact_id", Integer),
    Column("send_invoices_by_email", Boolean),
)
mailing_setting = Table(
    "mailing_setting", erp,
    Column("setting_id", Integer, primary_key=True),
    Column("class_id", String(10)),
    Column("customer_id", String(10)),
    Column("mailing_id", String(20)),
    Column("email_account_id", Integer),
    Column("report_id", String(8)),
    Column("template_id", String(30)),
    Column("format", String(10)),
    Column("active", Boolean),
)
mailing_recipient = Table(
    "mailing_recipient", erp,
    Column("recipient_id", Integer, primary_key=True),
    Column("setting_id", Integer),
    Column("contact_type", String(12)),
    Column("contact_id", Integer),
    Column("format", String(10)),
    Column("add_to", String(3)),
    Column("active", Boolean),
)
invoice = Table(
    "invoice", erp,
    Column("doc_type", String(3), primary_key=True),
    Column("ref_nbr", String(15), primary_key=True),
    Column("customer_id", String(10)),
    Column("status", String(10)),
    Column("released_at", DateTime),
    Column("doc_date", Date),
    Column("due_date", Date),
    Column("currency", String(3)),
    Column("amount", Numeric(18, 2)),
    Column("vat_amount", Numeric(18, 2)),
    Column("description", String(255)),
    Column("customer_ref", String(60)),
    Column("dont_email", Boolean),
    Column("emailed", Boolean),
)
invoice_line = Table(
    "invoice_line", erp,
    Column("doc_type", String(3), primary_key=True),
    Column("ref_nbr", String(15), primary_key=True),
    Column("line_nbr", Integer, primary_key=True),
    Column("description", String(255)),
    Column("quantity", Numeric(18, 4)),
    Column("unit_price", Numeric(18, 4)),
    Column("vat_rate", Numeric(5, 2)),
    Column("amount", Numeric(18, 2)),
)
customer_address = Table(
    "customer_address", erp,
    Column("customer_id", String(10), primary_key=True),
    Column("street", String(100)),
    Column("postal_code", String(20)),
    Column("city", String(60)),
    Column("country_code", String(2)),
    Column("org_number", String(30)),
    Column("vat_number", String(30)),
    Column("peppol_id", String(60)),
)


INVOICE_MAILING = "INVOICE"
# SQLite and PostgreSQL both accept a few thousand bound parameters; stay well below.
_CHUNK = 500


def create_erp_schema(engine: Engine) -> None:
    """Create the contract tables from the project's copy of the ERP DDL (demo and tests)."""
    statements = [s.strip() for s in _strip_comments(DDL_PATH.read_text()).split(";")]
    with engine.begin() as conn:
        for statement in filter(None, statements):
            conn.exec_driver_sql(statement)


def _strip_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


@dataclass(frozen=True)
class DueDocument:
    """A document the extract step found due: just enough to route it to a batch, and its total for the
    night's volume (the approval brake). A document only the ledger still owes has no total here."""

    doc_type: str
    ref_nbr: str
    customer_id: str
    currency: str = ""
    amount: Decimal = Decimal(0)


def due_documents(
    engine: Engine,
    *,
    released_before: datetime,
    released_since: datetime | None,
    customers: Sequence[str] = (),
    documents: Sequence[str] = (),
    include_emailed: bool = False,
    chunk: int = 5000,
) -> Iterator[list[DueDocument]]:
    """Documents due by docs/rules.md, rule 1 as far as the ERP alone can tell (the ledger filters next),
    streamed in chunks of ``chunk`` (a server-side cursor on PostgreSQL), in customer order.

    ``released_since`` is the look-back window's start (None = no window);
    ``include_emailed`` is for an operator's resend of documents already marked as emailed.
    """
    conditions = [
        invoice.c.released_at.is_not(None),
        invoice.c.released_at < released_before,
        invoice.c.status.in_(RELEASED_STATUSES),
        invoice.c.dont_email.is_(False),
    ]
    if released_since is not None:
        conditions.append(invoice.c.released_at >= released_since)
    if not include_emailed:
        conditions.append(invoice.c.emailed.is_(False))
    if customers:
        conditions.append(invoice.c.customer_id.in_(list(customers)))
    if documents:
        conditions.append(invoice.c.ref_nbr.in_(list(documents)))
    query = (
        select(invoice.c.doc_type, invoice.c.ref_nbr, invoice.c.customer_id, invoice.c.currency, invoice.c.amount)
        .where(and_(*conditions))
        .order_by(invoice.c.customer_id, invoice.c.doc_type, invoice.c.ref_nbr)
    )
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=chunk).execute(query)
        for rows in result.partitions():
            yield [DueDocument(*row) for row in rows]


@dataclass
class BatchData:
    """Everything the rules need to plan the documents of a few customers."""

    customers: dict[str, Customer] = field(default_factory=dict)
    contacts: dict[int, Contact] = field(default_factory=dict)
    customer_settings: dict[str, MailingSetting] = field(default_factory=dict)
    class_settings: dict[str, MailingSetting] = field(default_factory=dict)
    accounts: dict[int, EmailAccount] = field(default_factory=dict)
    reports: dict[str, Report] = field(default_factory=dict)
    templates: dict[tuple[str, str], NotificationTemplate] = field(default_factory=dict)
    documents: list[Document] = field(default_factory=list)
    addresses: dict[str, CustomerAddress] = field(default_factory=dict)  # customer_address, where there is one


def load_batch(engine: Engine, document_keys: Iterable[tuple[str, str]]) -> BatchData:
    """Load the given documents, their lines, customers and every setting that can apply to them."""
    keys = sorted({(d, r) for d, r in document_keys})
    data = BatchData()
    with engine.connect() as conn:
        headers, lines = [], {}
        for chunk in _chunks(keys):
            headers += conn.execute(
                select(invoice).where(tuple_(invoice.c.doc_type, invoice.c.ref_nbr).in_(chunk))
            ).mappings().all()
            for row in conn.execute(
                select(invoice_line)
                .where(tuple_(invoice_line.c.doc_type, invoice_line.c.ref_nbr).in_(chunk))
                .order_by(invoice_line.c.line_nbr)
            ).mappings():
                lines.setdefault((row["doc_type"], row["ref_nbr"]), []).append(
                    DocumentLine(
                        line_nbr=row["line_nbr"],
                        description=row["description"],
                        quantity=_dec(row["quantity"]),
                        unit_price=_dec(row["unit_price"]),
                        vat_rate=_dec(row["vat_rate"]),
                        amount=_dec(row["amount"]),
                    )
                )
        data.documents = [
            Document(
                doc_type=h["doc_type"],
                ref_nbr=h["ref_nbr"],
                customer_id=h["customer_id"],
                status=h["status"],
                doc_date=h["doc_date"],
                due_date=h["due_date"],
                currency=h["currency"],
                amount=_dec(h["amount"]),
                vat_amount=_dec(h["vat_amount"]),
                description=h["description"],
                customer_ref=h["customer_ref"],
                lines=tuple(lines.get((h["doc_type"], h["ref_nbr"]), ())),
                released_at=h["released_at"],
                dont_email=bool(h["dont_email"]),
                emailed=bool(h["emailed"]),
            )
            for h in sorted(headers, key=lambda h: (h["customer_id"], h["doc_type"], h["ref_nbr"]))
        ]

        customer_ids = sorted({d.customer_id for d in data.documents})
        for chunk in _chunks(customer_ids):
            for row in conn.execute(select(customer).where(customer.c.customer_id.in_(chunk))).mappings():
                data.customers[row["customer_id"]] = Customer(**row)
        class_ids = sorted({c.class_id for c in data.customers.values()})
        # customer_address came with the e-invoice formats: an ERP database without it still mails PDF and
        # HTML, and its FACTURX and EHF recipients fail for want of the buyer's address.
        if inspect(conn).has_table("customer_address"):
            for chunk in _chunks(customer_ids):
                for row in conn.execute(
                    select(customer_address).where(customer_address.c.customer_id.in_(chunk))
                ).mappings():
                    data.addresses[row["customer_id"]] = CustomerAddress(**row)

        setting_rows = []
        for chunk in _chunks(customer_ids):
            setting_rows += conn.execute(
                select(mailing_setting).where(
                    mailing_setting.c.mailing_id == INVOICE_MAILING,
                    mailing_setting.c.customer_id.in_(chunk),
                )
            ).mappings().all()
        setting_rows += conn.execute(
            select(mailing_setting).where(
                mailing_setting.c.mailing_id == INVOICE_MAILING,
                mailing_setting.c.class_id.in_(class_ids),
            )
        ).mappings().all()
        recipients: dict[int, list[RecipientRow]] = {}
        setting_ids = sorted({r["setting_id"] for r in setting_rows})
        for chunk in _chunks(setting_ids):
            for row in conn.execute(
                select(mailing_recipient)
                .where(mailing_recipient.c.setting_id.in_(chunk))
                .order_by(mailing_recipient.c.recipient_id)
            ).mappings():
                recipients.setdefault(row["setting_id"], []).append(RecipientRow(**row))
        # Several rows for one owner are an ERP data error; the lowest setting_id wins, as in the ERP's grid.
        for row in sorted(setting_rows, key=lambda r: r["setting_id"], reverse=True):
            setting = MailingSetting(**row, recipients=tuple(recipients.get(row["setting_id"], ())))
            if setting.customer_id is not None:
                data.customer_settings[setting.customer_id] = setting
            else:
                data.class_settings[setting.class_id] = setting

        contact_ids = {c.primary_contact_id for c in data.customers.values()}
        contact_ids |= {c.invoice_contact_id for c in data.customers.values()}
        for setting in [*data.customer_settings.values(), *data.class_settings.values()]:
            contact_ids |= {r.contact_id for r in setting.recipients}
        contact_ids.discard(None)
        for chunk in _chunks(sorted(contact_ids)):
            for row in conn.execute(select(contact).where(contact.c.contact_id.in_(chunk))).mappings():
                data.contacts[row["contact_id"]] = Contact(**row)

        account_ids = sorted(
            {s.email_account_id for s in [*data.customer_settings.values(), *data.class_settings.values()]}
            - {None}
        )
        if account_ids:
            for row in conn.execute(
                select(email_account).where(email_account.c.account_id.in_(account_ids))
            ).mappings():
                data.accounts[row["account_id"]] = EmailAccount(**row)
        for row in conn.execute(select(report)).mappings():
            data.reports[row["report_id"]] = Report(**row)
        for row in conn.execute(select(notification_template)).mappings():
            data.templates[(row["template_id"], row["locale"])] = NotificationTemplate(**row)
    return data


def email_accounts(engine: Engine) -> list[EmailAccount]:
    """Every email account of the ERP, by id: what the deployer's check logs in with."""
    with engine.connect() as conn:
        return [EmailAccount(**row) for row in
                conn.execute(select(email_account).order_by(email_account.c.account_id)).mappings()]


def mark_emailed(engine: Engine, document_keys: Iterable[tuple[str, str]]) -> int:
    """Write back ``invoice.emailed`` (the one column the pipeline may change); idempotent."""
    keys = sorted(set(document_keys))
    changed = 0
    with engine.begin() as conn:
        for chunk in _chunks(keys):
            changed += conn.execute(
                update(invoice)
                .where(
                    tuple_(invoice.c.doc_type, invoice.c.ref_nbr).in_(chunk),
                    or_(invoice.c.emailed.is_(False), invoice.c.emailed.is_(None)),
                )
                .values(emailed=True)
            ).rowcount
    return changed


def _chunks(items: Sequence, size: int = _CHUNK):
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _dec(value) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value if value is not None else 0))
