"""A tiny ERP for tests: the contract schema with defaults, so that a test states only what it is about."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy import Engine, insert

from include.invoice_mailing import source

RUN_DATE = date(2026, 11, 24)


class TinyErp:
    """Builds rows through the contract tables. Starts with one class, account, report and template."""

    def __init__(self, engine: Engine, *, with_defaults: bool = True):
        self.engine = engine
        source.create_erp_schema(engine)
        self._ids = {"contact": 100, "setting": 10, "recipient": 1000}
        if with_defaults:
            self.add("customer_class", class_id="DOMESTIC", description="Domestic")
            self.add("email_account", account_id=1, address="faktura@fjordlys.example",
                     display_name="Fjordlys Faktura", smtp_conn_id=None)
            self.add("report", report_id="AR641000", description="Invoice/Memo", template_name="invoice")
            self.template("InvoiceNotification", "", "{{ document.type_label }} {{ document.number }}",
                          "<p>Dear {{ customer.name }},</p><p>{{ document.type_label }} {{ document.number }} "
                          "of {{ document.total }} is attached.</p>")

    def add(self, table: str, **values) -> dict:
        with self.engine.begin() as conn:
            conn.execute(insert(source.erp.tables[table]).values(**values))
        return values

    def _next(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]

    def template(self, template_id: str, locale: str, subject: str, body_html: str) -> None:
        self.add("notification_template", template_id=template_id, locale=locale, subject=subject,
                 body_html=body_html)

    def contact(self, customer_id: str | None, email: str | None, name: str = "Kari Nordmann", **extra) -> int:
        contact_id = extra.pop("contact_id", None) or self._next("contact")
        self.add("contact", contact_id=contact_id, customer_id=customer_id, display_name=name, email=email,
                 preferred_format=extra.pop("preferred_format", None), is_employee=extra.pop("is_employee", False),
                 active=extra.pop("active", True))
        return contact_id

    def customer(self, customer_id: str, name: str = "Bølgen Kafé AS", *, invoice_email: str | None = None,
                 **extra) -> str:
        values = dict(customer_id=customer_id, name=name, class_id="DOMESTIC", status="Active", locale="nb_NO",
                      email=None, primary_contact_id=None, invoice_contact_id=None, send_invoices_by_email=True)
        values.update(extra)
        self.add("customer", **values)
        if invoice_email is not None:
            contact_id = self.contact(customer_id, invoice_email)
            with self.engine.begin() as conn:
                conn.execute(source.customer.update().where(source.customer.c.customer_id == customer_id)
                             .values(invoice_contact_id=contact_id))
        return customer_id

    def address(self, customer_id: str, country_code: str = "NO", **extra) -> dict:
        """The customer's legal and postal details (customer_address), valid for an e-invoice unless told."""
        values = dict(customer_id=customer_id, street="Bryggen 3", postal_code="5003", city="Bergen",
                      country_code=country_code, org_number="987654325", vat_number="NO987654325MVA",
                      peppol_id="0192:987654325")
        values.update(extra)
        return self.add("customer_address", **values)

    def setting(self, *, class_id: str | None = None, customer_id: str | None = None, **extra) -> int:
        setting_id = self._next("setting")
        values = dict(setting_id=setting_id, class_id=class_id, customer_id=customer_id, mailing_id="INVOICE",
                      email_account_id=1, report_id="AR641000", template_id="InvoiceNotification", format="PDF",
                      active=True)
        values.update(extra)
        self.add("mailing_setting", **values)
        return setting_id

    def recipient(self, setting_id: int, contact_type: str = "Invoicing", add_to: str = "To", **extra) -> int:
        recipient_id = self._next("recipient")
        self.add("mailing_recipient", recipient_id=recipient_id, setting_id=setting_id, contact_type=contact_type,
                 contact_id=extra.pop("contact_id", None), format=extra.pop("format", None), add_to=add_to,
                 active=extra.pop("active", True))
        return recipient_id

    def invoice(self, ref_nbr: str, customer_id: str, *, lines=((1, "Kaffebønner, hele 1 kg", "2", "199.50", "15"),),
                doc_type: str | None = None, released: datetime | None = None, **extra) -> str:
        doc_type = doc_type or ref_nbr[:3]
        amounts = [(Decimal(q) * Decimal(p)).quantize(Decimal("0.01")) for _, _, q, p, _ in lines]
        basis: dict[Decimal, Decimal] = {}  # VAT per rate on the document, as the ERP books it (EN 16931 BR-CO-17)
        for amount, line in zip(amounts, lines, strict=True):
            basis[Decimal(line[4])] = basis.get(Decimal(line[4]), Decimal(0)) + amount
        vat = sum(((b * rate / 100).quantize(Decimal("0.01"), ROUND_HALF_UP) for rate, b in basis.items()), Decimal(0))
        released = released or datetime.combine(RUN_DATE - timedelta(days=2), datetime.min.time()).replace(hour=10)
        values = dict(doc_type=doc_type, ref_nbr=ref_nbr, customer_id=customer_id, status="Open",
                      released_at=released, doc_date=released.date(), due_date=released.date() + timedelta(days=14),
                      currency="NOK", amount=sum(amounts, Decimal(0)) + vat, vat_amount=vat,
                      description=None, customer_ref="PO-4471", dont_email=False, emailed=False)
        values.update(extra)
        self.add("invoice", **values)
        for (nbr, text, qty, price, rate), amount in zip(lines, amounts, strict=True):
            self.add("invoice_line", doc_type=doc_type, ref_nbr=ref_nbr, line_nbr=nbr, description=text,
                     quantity=Decimal(qty), unit_price=Decimal(price), vat_rate=Decimal(rate), amount=amount)
        return ref_nbr
