"""Render documents (Jinja2 report templates to PDF via WeasyPrint, or to self-contained HTML) and
notifications (user-editable templates in a Jinja2 sandbox). No database, no SMTP."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import cached_property, lru_cache
from html.parser import HTMLParser
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import missing, object_type_repr

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



class TemplateBudgetExceeded(RuntimeError):
    """A template ran longer, or wrote more, than a template may."""


@dataclass(frozen=True)
class Budget:
    """What one rendering of a template may cost. Settings: ``INVOICE_MAILING_TEMPLATE_SECONDS``, ``..._BYTES``."""

    seconds: float
    max_bytes: int

    @classmethod
    def from_env(cls, prefix: str, seconds: float, max_bytes: int) -> Budget:
        return cls(float(os.environ.get(f"{prefix}_SECONDS", seconds)), int(os.environ.get(f"{prefix}_BYTES", max_bytes)))


_deadline: ContextVar[tuple[float, Budget] | None] = ContextVar("template_deadline", default=None)


def _check_budget() -> None:
    current = _deadline.get()
    if current is not None and time.monotonic() > current[0]:
        raise TemplateBudgetExceeded(f"the template ran for more than {current[1].seconds:g} s")


class Values(dict):
    """The values a template sees under one name (``document``, ``customer``...): the name goes into errors."""

    def __init__(self, path: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._path = path


class NamedUndefined(StrictUndefined):
    """Strict: using a value the pipeline does not provide is an error that names it (``document.refnr``)."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        if self._undefined_obj is missing:
            return f"{self._undefined_name!r} is undefined"
        owner = getattr(self._undefined_obj, "_path", None) or object_type_repr(self._undefined_obj)
        return f"{owner}.{self._undefined_name} is undefined"


class _BoundedRange:
    """``range()`` in a template: at most 100,000 steps (as Jinja's sandbox), each step checks the clock."""

    def __init__(self, steps: range):
        if len(steps) > 100_000:
            raise TemplateBudgetExceeded("range() may count at most 100,000 steps in a template")
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        for value in self.steps:
            _check_budget()
            yield value


class BoundedSandbox(SandboxedEnvironment):
    """The ERP's templates are untrusted: sandboxed, strict, and bounded in time and in what they write.

    The clock is checked on every attribute, item and call a template makes and on every step of
    ``range()``; ``*`` and ``**`` may not build values larger than the output may be.
    """

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, budget: Budget, **options):
        super().__init__(undefined=NamedUndefined, **options)
        self.budget = budget
        self.globals["range"] = self._range

    @staticmethod
    def _range(*args) -> _BoundedRange:
        return _BoundedRange(range(*args))

    def getattr(self, obj, attribute):
        _check_budget()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_budget()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        _check_budget()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise TemplateBudgetExceeded("a power above 64 in a template")
        if operator == "*" and isinstance(left, str | list | tuple) != isinstance(right, str | list | tuple):
            size = len(left if isinstance(left, str | list | tuple) else right)
            times = right if isinstance(right, int) else left
            if isinstance(times, int) and size * times > self.budget.max_bytes:
                raise TemplateBudgetExceeded(f"the template builds a value larger than {self.budget.max_bytes} bytes")
        return super().call_binop(context, operator, left, right)


def render_bounded(template, values: dict, budget: Budget) -> str:
    """Render within ``budget``: the clock and the output's size are checked as the output streams."""
    token = _deadline.set((time.monotonic() + budget.seconds, budget))
    try:
        parts, size = [], 0
        for part in template.generate(values):
            size += len(part)
            if size > budget.max_bytes:
                raise TemplateBudgetExceeded(f"the template wrote more than {budget.max_bytes} bytes")
            _check_budget()
            parts.append(part)
        return "".join(parts)
    finally:
        _deadline.reset(token)


def describe(exc: BaseException) -> str:
    """An error for the ledger and the log: its kind and message, on one line."""
    text = one_line(str(exc), 300)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


NOTIFICATION_BUDGET = Budget.from_env("INVOICE_MAILING_TEMPLATE", seconds=2.0, max_bytes=1_000_000)
REPORT_BUDGET = Budget.from_env("INVOICE_MAILING_REPORT", seconds=120.0, max_bytes=50_000_000)


class Renderer:
    """One per worker process: the Jinja2 environments, the font configuration and the company."""

    def __init__(self, templates_dir: Path = TEMPLATES_DIR, company_file: Path | None = None,
                 notification_budget: Budget = NOTIFICATION_BUDGET, report_budget: Budget = REPORT_BUDGET):
        self.templates_dir = Path(templates_dir)
        self.report_budget = report_budget
        self.reports = Environment(
            loader=FileSystemLoader(self.templates_dir),
            autoescape=select_autoescape(("html", "j2", "htm")),
            undefined=NamedUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        # Notification templates come from the ERP: anyone with access to its settings can edit them.
        self.notification_budget = notification_budget
        self.notifications = BoundedSandbox(notification_budget, autoescape=True)
        self.subjects = BoundedSandbox(notification_budget, autoescape=False)
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

    def warm(self) -> None:
        """Load now what the first document would: WeasyPrint, fonts, every report's stylesheets and
        template (a worker process does this once, before it forks task processes)."""
        for template in sorted((self.templates_dir / REPORTS).glob("*.html.j2")):
            name = template.name.removesuffix(".html.j2")
            if self.has_report(name):
                self.stylesheets(name)
                self.reports.get_template(f"{REPORTS}/{template.name}")

    def disown_font_files(self) -> None:
        """In a forked child: leave the parent's @font-face folder to the parent."""
        if "font_config" in self.__dict__:
            self.font_config._folder = None

    def has_report(self, template_name: str) -> bool:
        folder = self.templates_dir / REPORTS
        return (folder / f"{template_name}.html.j2").is_file() and (folder / f"{template_name}.css").is_file()

    # --- the document -----------------------------------------------------------------------

    def document_context(self, document: Document, customer: Customer, attention: str | None,
                         formats: Formats) -> dict:
        """What a report template sees; a notification template sees the same less the labels.

        Each value has its friendly name and, where the ERP has a column for it, the column's name too
        (``document.number`` is ``document.ref_nbr``): the README lists them all.
        """
        vat_rows = [Values("document.vat_breakdown[]", rate=formats.percent(rate), basis=formats.amount(basis),
                           vat=formats.amount(vat))
                    for rate, basis, vat in vat_breakdown(document)]
        lines = [
            Values("line", nbr=line.line_nbr, line_nbr=line.line_nbr, description=line.description,
                   quantity=formats.quantity(line.quantity), unit_price=formats.amount(line.unit_price),
                   vat_rate=formats.percent(line.vat_rate), amount=formats.amount(line.amount))
            for line in document.lines
        ]
        label = document_label(document.doc_type, formats)
        values = Values(
            "document",
            type=document.doc_type, doc_type=document.doc_type, type_label=label,
            number=document.ref_nbr, ref_nbr=document.ref_nbr, status=document.status,
            date=formats.date(document.doc_date), doc_date=formats.date(document.doc_date),
            due_date=formats.date(document.due_date),
            customer_ref=document.customer_ref, description=document.description, currency=document.currency,
            is_credit=document.doc_type == "CRM", lines=lines, vat_breakdown=vat_rows,
            total_excl_vat=formats.amount(document.amount - document.vat_amount),
            total_vat=formats.amount(document.vat_amount), vat_amount=formats.amount(document.vat_amount),
            amount=formats.amount(document.amount), total=formats.money(document.amount, document.currency),
        )
        return {
            "document": values,
            "doc": values,
            "customer": Values("customer", number=customer.customer_id, customer_id=customer.customer_id,
                               name=customer.name, locale=formats.locale),
            "attention": attention,
            "company": Values("company", self.company),
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
            template = self.reports.get_template(f"{REPORTS}/{template_name}.html.j2")
            return render_bounded(template, {**context, "for_pdf": for_pdf, "page_label": (before, between, after)},
                                  self.report_budget)
        except Exception as exc:  # noqa: BLE001 - whatever a template raises is that document's config error
            raise RenderError(f"report template {template_name!r} ({formats.locale}) failed: {describe(exc)}") from exc

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
        """Subject and body from an untrusted ERP template: sandboxed, strict, bounded; ERP values escaped.

        Whatever the template raises (a syntax error, a division by zero, an unknown value, a loop that
        outlasts its budget) is a RenderError that names the template, its locale and the error.
        """
        formats = Formats(locale)
        context = self.document_context(document, customer, None, formats)
        values = {
            "document": context["document"],
            "customer": context["customer"],
            "sender": Values("sender", address=sender["address"], name=sender.get("name") or "",
                             display_name=sender.get("name") or ""),
            "company": context["company"],
            "payment_reference": context["payment_reference"],
        }
        try:
            subject = render_bounded(self.subjects.from_string(template.subject), values, self.notification_budget)
            html = render_bounded(self.notifications.from_string(template.body_html), values,
                                  self.notification_budget)
        except Exception as exc:  # noqa: BLE001 - including the sandbox's SecurityError and the budget
            raise RenderError(f"notification template {template.template_id!r} ({template.locale or 'default'}) "
                              f"failed: {describe(exc)}") from exc
        return Notification(subject=one_line(subject), html=html, text=html_to_text(html))
