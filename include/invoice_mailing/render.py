"""Render documents (Jinja2 report templates to PDF via WeasyPrint, or to self-contained HTML) and
notifications (user-editable templates in a Jinja2 sandbox). No database, no SMTP."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import cached_property, lru_cache
from html.parser import HTMLParser
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from include.invoice_mailing.i18n import Formats
from include.invoice_mailing.rules import DOC_TYPES, Customer, Document, NotificationTemplate

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
REPORTS = "reports"
CENT = Decimal("0.01")


class _OnlyOnce(logging.Filter):
    """WeasyPrint warns about its fontTools fallback for every font of every document: once is enough."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if "instead of HarfBuzz-Subset" not in str(record.msg):
            return True
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


logging.getLogger("weasyprint").addFilter(_OnlyOnce())


class RenderError(Exception):
    """A template is missing or broken: a configuration error of one mailing, not a crash of the run."""


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    maintype: str
    subtype: str

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class Notification:
    subject: str
    html: str
    text: str


def payment_reference(customer_id: str, ref_nbr: str, locale: str) -> str:
    """A KID/OCR-style reference: customer and document digits with a check digit the banks verify."""
    digits = re.sub(r"\D", "", customer_id) + re.sub(r"\D", "", ref_nbr)
    digits = digits or "0"
    if locale == "fi_FI":  # Finnish reference number: weights 7, 3, 1 from the right
        weights = (7, 3, 1)
        total = sum(int(d) * weights[i % 3] for i, d in enumerate(reversed(digits)))
        return digits + str((10 - total % 10) % 10)
    total = 0
    for i, d in enumerate(reversed(digits)):  # MOD10 (Luhn), as Norwegian KID and Swedish OCR
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return digits + str((10 - total % 10) % 10)


def vat_breakdown(document: Document) -> list[tuple[Decimal, Decimal, Decimal]]:
    """(rate, basis, VAT) per rate. VAT is computed on each rate's basis; a rounding difference of a few
    cents to the ERP's total VAT goes to the largest basis, so that the rows add up to the document."""
    basis: dict[Decimal, Decimal] = defaultdict(Decimal)
    for line in document.lines:
        basis[line.vat_rate] += line.amount
    vat = {rate: (amount * rate / 100).quantize(CENT, ROUND_HALF_UP) for rate, amount in basis.items()}
    difference = document.vat_amount - sum(vat.values(), Decimal(0))
    if vat and difference and abs(difference) <= CENT * len(document.lines):
        largest = max(basis, key=lambda rate: (basis[rate] * rate, rate))
        vat[largest] += difference
    return [(rate, basis[rate], vat[rate]) for rate in sorted(basis)]


def document_label(doc_type: str, formats: Formats) -> str:
    return formats.gettext(DOC_TYPES.get(doc_type, "Invoice"))


def attachment_filename(document: Document, fmt: str, formats: Formats) -> str:
    """``Invoice INV000123.pdf``, ``Kreditnota CRM000045.html``: localised, and safe as a file name."""
    number = re.sub(r"[^A-Za-z0-9._-]", "_", document.ref_nbr)
    return f"{document_label(document.doc_type, formats)} {number}.{fmt.lower()}"


class _TextFromHtml(HTMLParser):
    BREAKS = {"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "table", "ul", "ol"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script", "head"):
            self._skip += 1
        elif tag in self.BREAKS:
            self.parts.append("\n")
        elif tag == "td":
            self.parts.append("\t")

    def handle_endtag(self, tag):
        if tag in ("style", "script", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BREAKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The plain-text alternative of an HTML body: its text, with blocks on lines of their own."""
    parser = _TextFromHtml()
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def one_line(text: str, limit: int = 250) -> str:
    """A header value: all whitespace (CR and LF included) folded to single spaces."""
    return " ".join(str(text).split())[:limit]


class Renderer:
    """One per worker process: the Jinja2 environments, the font configuration and the company."""

    def __init__(self, templates_dir: Path = TEMPLATES_DIR, company_file: Path | None = None):
        self.templates_dir = Path(templates_dir)
        self.reports = Environment(
            loader=FileSystemLoader(self.templates_dir),
            autoescape=select_autoescape(("html", "j2", "htm")),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        # Notification templates come from the ERP: anyone with access to its settings can edit them.
        self.notifications = SandboxedEnvironment(autoescape=True)
        self.subjects = SandboxedEnvironment(autoescape=False)
        company_file = company_file or Path(os.environ.get("INVOICE_MAILING_COMPANY",
                                                          self.templates_dir / "company.json"))
        self.company = json.loads(Path(company_file).read_text(encoding="utf-8"))

    @cached_property
    def font_config(self):
        from weasyprint.text.fonts import FontConfiguration

        return FontConfiguration()

    @cached_property
    def report_settings(self) -> dict:
        """Per ERP report (report_id): options such as ``{"pdf_variant": "pdf/a-3b"}``."""
        path = self.templates_dir / REPORTS / "settings.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    @lru_cache(maxsize=16)  # noqa: B019 - one Renderer lives as long as its worker process
    def stylesheets(self, template_name: str) -> list:
        """The report's stylesheet and the print sheet, parsed once: parsing CSS per document is waste."""
        from weasyprint import CSS

        folder = self.templates_dir / REPORTS
        return [CSS(filename=str(folder / f"{template_name}.css"), font_config=self.font_config),
                CSS(filename=str(folder / "print.css"), font_config=self.font_config)]

    def has_report(self, template_name: str) -> bool:
        folder = self.templates_dir / REPORTS
        return (folder / f"{template_name}.html.j2").is_file() and (folder / f"{template_name}.css").is_file()

    # --- the document -----------------------------------------------------------------------

    def document_context(self, document: Document, customer: Customer, attention: str | None,
                         formats: Formats) -> dict:
        vat_rows = [{"rate": formats.percent(rate), "basis": formats.amount(basis), "vat": formats.amount(vat)}
                    for rate, basis, vat in vat_breakdown(document)]
        return {
            "doc": {
                "type": document.doc_type,
                "type_label": document_label(document.doc_type, formats),
                "number": document.ref_nbr,
                "date": formats.date(document.doc_date),
                "due_date": formats.date(document.due_date),
                "customer_ref": document.customer_ref,
                "description": document.description,
                "currency": document.currency,
                "is_credit": document.doc_type == "CRM",
                "lines": [
                    {"nbr": line.line_nbr, "description": line.description,
                     "quantity": formats.quantity(line.quantity), "unit_price": formats.amount(line.unit_price),
                     "vat_rate": formats.percent(line.vat_rate), "amount": formats.amount(line.amount)}
                    for line in document.lines
                ],
                "vat_breakdown": vat_rows,
                "total_excl_vat": formats.amount(document.amount - document.vat_amount),
                "total_vat": formats.amount(document.vat_amount),
                "total": formats.money(document.amount, document.currency),
            },
            "customer": {"number": customer.customer_id, "name": customer.name},
            "attention": attention,
            "company": self.company,
            "payment_reference": payment_reference(customer.customer_id, document.ref_nbr, formats.locale),
            "lang": formats.locale.split("_")[0],
            "_": formats.gettext,
        }

    def report_html(self, template_name: str, context: dict, *, for_pdf: bool, formats: Formats) -> str:
        if not self.has_report(template_name):
            raise RenderError(f"report template {template_name!r} does not exist in {self.templates_dir / REPORTS}")
        before, _, rest = formats.gettext("Page {page} of {pages}").partition("{page}")
        between, _, after = rest.partition("{pages}")
        try:
            return self.reports.get_template(f"{REPORTS}/{template_name}.html.j2").render(
                **context, for_pdf=for_pdf, page_label=(before, between, after))
        except TemplateError as exc:
            raise RenderError(f"report template {template_name!r} failed: {exc}") from exc

    def attachment(self, document: Document, customer: Customer, attention: str | None, template_name: str,
                   fmt: str, locale: str | None, report_id: str | None = None) -> Attachment:
        """The document as the customer receives it: a PDF, or a self-contained HTML file."""
        formats = Formats(locale)
        context = self.document_context(document, customer, attention, formats)
        html = self.report_html(template_name, context, for_pdf=fmt == "PDF", formats=formats)
        name = attachment_filename(document, fmt, formats)
        if fmt == "HTML":
            return Attachment(name, html.encode("utf-8"), "text", "html")
        return Attachment(name, self.pdf(html, template_name, report_id), "application", "pdf")

    def pdf(self, html: str, template_name: str, report_id: str | None = None) -> bytes:
        from weasyprint import HTML

        options = self.report_settings.get(report_id or "", {})
        return HTML(string=html, base_url=str(self.templates_dir)).write_pdf(
            stylesheets=self.stylesheets(template_name), font_config=self.font_config,
            pdf_variant=options.get("pdf_variant"))

    # --- the notification -------------------------------------------------------------------

    def notification(self, template: NotificationTemplate, document: Document, customer: Customer,
                     sender: dict, locale: str | None) -> Notification:
        """Subject and body from an untrusted ERP template, sandboxed; ERP values are escaped."""
        formats = Formats(locale)
        context = self.document_context(document, customer, None, formats)
        values = {
            "document": {**context["doc"], "amount": formats.amount(document.amount),
                         "vat_amount": formats.amount(document.vat_amount)},
            "customer": context["customer"],
            "sender": sender,
            "company": self.company,
            "payment_reference": context["payment_reference"],
        }
        try:
            subject = self.subjects.from_string(template.subject).render(values)
            html = self.notifications.from_string(template.body_html).render(values)
        except TemplateError as exc:  # includes the sandbox's SecurityError
            raise RenderError(f"notification template {template.template_id!r} ({template.locale or 'default'}) "
                              f"failed: {exc}") from exc
        return Notification(subject=one_line(subject), html=html, text=html_to_text(html))
