"""Render documents (Jinja2 report templates to PDF via WeasyPrint, or to self-contained HTML) and
notifications (user-editable templates in a Jinja2 sandbox). No database, no SMTP."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import string
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sized
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import cached_property, lru_cache, partial, wraps
from html.parser import HTMLParser
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined, nodes, select_autoescape
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg, generate_lorem_ipsum, missing, object_type_repr
from markupsafe import Markup

from include.invoice_mailing import einvoice, facturx_pdf, parties
from include.invoice_mailing.i18n import Formats
from include.invoice_mailing.identifiers import kid_check_digit
from include.invoice_mailing.rules import (
    DOC_TYPES,
    E_INVOICE_FORMATS,
    Customer,
    CustomerAddress,
    Document,
    NotificationTemplate,
)

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
REPORTS = "reports"


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


class Values(Mapping):
    """The values a template sees under one name (``document``, ``customer``...), frozen all the way down
    (lists become tuples, mappings become Values): no template can change what a later document prints.
    The name goes into errors."""

    __slots__ = ("_path", "_data")

    def __init__(self, path: str, *args, **kwargs):
        self._path = path
        self._data = {key: freeze(value, f"{path}.{key}") for key, value in dict(*args, **kwargs).items()}

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


def freeze(value, path: str = "value"):
    """``value`` as a template may see it: what is a list or a mapping becomes a tuple or Values."""
    if isinstance(value, Values | str | bytes | int | float | Decimal | date) or value is None:
        return value
    if isinstance(value, Mapping):
        return Values(path, value)
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(freeze(item, f"{path}[]") for item in value)
    raise TypeError(f"{path}: a {type(value).__name__} cannot be frozen for a template")


def size_of(value, limit: int) -> int:
    """About how many characters ``value`` takes when written out, counting every reference to a shared
    value again (as writing it out does); counting stops once it passes ``limit``."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 3 // 10 + 1
        elif isinstance(item, _BoundedRange):
            total += len(item) * 8
        elif isinstance(item, Mapping):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        else:
            total += 24
        if total > limit:
            break
    return total


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


def _steps(iterable):
    """What every ``{% for %}`` of a template iterates: its items, the clock checked before each (a loop over a
    string, or over another loop, would otherwise run with no attribute, call or output to check it)."""
    for item in iterable:
        _check_budget()
        yield item


_PRINTF_SPEC = re.compile(r"%(?:\(([^)]*)\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")
_FORMAT_SPEC_NUMBERS = re.compile(r"\d+")


def _printf_size(text: str, args, limit: int) -> int:
    """What ``text % args`` writes at most: the text, each argument, and each width and precision."""
    total, position = len(text), 0
    items = args if isinstance(args, tuple) else (args,)
    for key, width, precision, kind in _PRINTF_SPEC.findall(text):
        for number in (width, precision):
            if number == "*":
                star = items[position] if position < len(items) else 0
                total += star if isinstance(star, int) else 0
                position += 1
            elif number:
                total += int(number)
        if kind == "%":
            continue
        if key and isinstance(args, Mapping):
            total += size_of(args.get(key), limit)
        elif position < len(items):
            total += size_of(items[position], limit)
            position += 1
        if total > limit:
            break
    return total


def _format_size(text: str, args: tuple, kwargs: Mapping, limit: int) -> int:
    """What ``text.format(*args, **kwargs)`` writes at most: the text, each field's value (all of it,
    even for ``{0.name}``), and every number in a format spec (widths, precisions), nested fields included."""
    total, auto = len(text), 0
    for _, field, spec, _ in string.Formatter().parse(text):
        if field is None:
            continue
        first = re.split(r"[.\[]", field, maxsplit=1)[0]
        if first == "":
            first, auto = str(auto), auto + 1
        value = args[int(first)] if first.isdigit() and int(first) < len(args) else kwargs.get(first)
        total += size_of(value, limit) + sum(int(n) for n in _FORMAT_SPEC_NUMBERS.findall(spec or ""))
        if spec and "{" in spec:  # a width taken from the arguments
            total += sum(v for v in (*args, *kwargs.values()) if isinstance(v, int))
        if total > limit:
            break
    return total


def _digits(bits: int) -> int:
    """The decimal digits of an integer of ``bits`` bits; above 4,300 the integer is refused: Python will
    not write it out, and multiplying huge integers takes time no clock check can interrupt."""
    digits = bits * 3 // 10 + 1
    if digits > 4300:
        raise TemplateBudgetExceeded("the template builds an integer of more than 4,300 digits")
    return digits


def _width(value) -> int:
    return value if isinstance(value, int) else size_of(value, 1 << 62)


# What a filter or a str method may write, estimated from its arguments before it runs (``limit`` stops
# counting early); filters not named here write at most a few times what they are given.
_FILTER_SIZES = {
    "center": lambda limit, value, width=80: size_of(value, limit) + _width(width),
    "indent": lambda limit, s, width=4, first=False, blank=False:
        size_of(s, limit) * (1 + _width(width)) + _width(width),
    "join": lambda limit, value, d="", attribute=None:
        size_of(value, limit) + len(str(d)) * (len(value) if isinstance(value, Sized) else limit),
    "format": lambda limit, value, *args, **kwargs:
        _printf_size(str(value), kwargs or args, limit),
    "replace": lambda limit, s, old, new, count=None:
        size_of(s, limit) + size_of(new, limit) * (str(s).count(str(old)) + 1 if count is None else count),
    "wordwrap": lambda limit, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True:
        size_of(s, limit) * (1 + len(wrapstring or "\n")),
    "truncate": lambda limit, s, length=255, killwords=False, end="...", leeway=None:
        size_of(s, limit) + size_of(end, limit),
    "batch": lambda limit, value, linecount, fill_with=None: size_of(value, limit) + _width(linecount) * (
        1 + size_of(fill_with, limit)),
    "slice": lambda limit, value, slices, fill_with=None: size_of(value, limit) + _width(slices) * (
        1 + size_of(fill_with, limit)),
    "sum": lambda limit, iterable, attribute=None, start=0: size_of(iterable, limit) + size_of(start, limit),
}
_STR_METHOD_SIZES = {
    "center": lambda limit, s, width, fillchar=" ": len(s) + _width(width),
    "ljust": lambda limit, s, width, fillchar=" ": len(s) + _width(width),
    "rjust": lambda limit, s, width, fillchar=" ": len(s) + _width(width),
    "zfill": lambda limit, s, width: len(s) + _width(width),
    "expandtabs": lambda limit, s, tabsize=8: len(s) * (1 + max(_width(tabsize), 0)),
    "join": lambda limit, s, iterable: size_of(iterable, limit) + len(s) * (
        len(iterable) if isinstance(iterable, Sized) else limit),
    "replace": lambda limit, s, old, new, count=-1: len(s) + size_of(new, limit) * (
        s.count(str(old)) + 1 if count < 0 else count),
    "translate": lambda limit, s, table: len(s) * (1 + size_of(table, limit)),
    # str -> bytes -> str: UTF-32 writes four bytes a character (and a BOM), an escape up to ten ("\\U0001f600").
    "encode": lambda limit, s, encoding="utf-8", errors="strict": 4 * len(s) + 4 if errors == "strict" else 10 * len(s),
    "decode": lambda limit, s, encoding="utf-8", errors="strict": 10 * len(s),
    "hex": lambda limit, s, sep=None, bytes_per_sep=1: 3 * len(s),
}
# Filters that only look at a value, or hand back (references to) what they were given.
_FILTERS_THAT_DO_NOT_GROW = frozenset({
    "abs", "attr", "count", "d", "default", "dictsort", "first", "float", "groupby", "int", "items", "last",
    "length", "map", "max", "min", "random", "reject", "rejectattr", "reverse", "round", "select",
    "selectattr", "sort", "unique", "wordcount", "filesizeformat",
})
# Escaping, JSON, URL encoding, repr: one character of the input becomes at most this many.
_GROWTH = 12


class _BoundedItems:
    """An iterator a filter consumes (``map``'s output): it stops the template once what it has handed
    out passes the budget, before more is built."""

    def __init__(self, items, limit: int):
        self.items, self.limit, self.total = iter(items), limit, 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        _check_budget()
        self.total += size_of(item, self.limit) + 2
        if self.total > self.limit:
            raise TemplateBudgetExceeded(f"the template builds a value larger than {self.limit} bytes")
        return item


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The ERP's templates are untrusted: sandboxed, strict, immutable, and bounded in time and in size.

    The clock is checked on every attribute, item and call a template makes and on every step of
    ``range()``. Every way a template can build a value (``*``, ``**``, ``+``, ``%``, ``~``, ``format``,
    ``join``, ``center`` and the other filters and str methods, ``range``, ``lipsum``, writing a value
    out) is estimated from its operands first, and refused if the result could be larger than the
    output may be: nothing large is built to find out.
    """

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, budget: Budget, **options):
        super().__init__(undefined=NamedUndefined, finalize=self._finalize, **options)
        self.budget = budget
        self.code_generator_class = _BoundedConcatGenerator
        self.globals["range"] = self._range
        self.globals["lipsum"] = self._lipsum
        self.filters = {name: self._bounded_filter(name, func) for name, func in self.filters.items()}
        self.filters["__steps"] = _steps  # a template that names it gets its items back, the clock checked

    def _parse(self, source, name, filename):
        """The template's tree, with every ``{% for %}`` iterating through ``_steps``."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "__steps", [], [], None, None, lineno=loop.lineno)
        return tree

    def refuse_larger(self, size: int) -> None:
        if size > self.budget.max_bytes:
            raise TemplateBudgetExceeded(f"the template builds a value larger than {self.budget.max_bytes} bytes")

    def _size(self, value) -> int:
        return size_of(value, self.budget.max_bytes)

    def _finalize(self, value):
        """Every ``{{ value }}``: a value that is written out must fit the output before it is converted."""
        self.refuse_larger(self._size(value))
        return value

    @staticmethod
    def _range(*args) -> _BoundedRange:
        return _BoundedRange(range(*args))

    def _lipsum(self, n: int = 5, html: bool = True, min: int = 20, max: int = 100):  # noqa: A002 - Jinja's names
        self.refuse_larger(_width(n) * _width(max) * 16)
        return generate_lorem_ipsum(n, html, min, max)

    def _bounded_filter(self, name: str, func):
        estimate = _FILTER_SIZES.get(name)
        skip = 1 if _PassArg.from_obj(func) else 0  # the context or environment Jinja passes first
        limit = self.budget.max_bytes

        @wraps(func)
        def bounded(*args, **kwargs):
            if len(args) > skip and isinstance(args[skip], Iterator):  # e.g. map()'s output: taken while it fits
                args = (*args[:skip], list(_BoundedItems(args[skip], limit)), *args[skip + 1:])
            if estimate is not None:
                self.refuse_larger(estimate(limit, *args[skip:], **kwargs))
            elif name not in _FILTERS_THAT_DO_NOT_GROW:
                self.refuse_larger(_GROWTH * sum(self._size(value) for value in (*args[skip:], *kwargs.values())))
            return func(*args, **kwargs)

        return bounded

    def getattr(self, obj, attribute):
        _check_budget()
        value = super().getattr(obj, attribute)
        estimate = _STR_METHOD_SIZES.get(attribute) if isinstance(obj, str | bytes | bytearray) else None
        if estimate is None or not isinstance(value, types.BuiltinMethodType):
            return value
        limit = self.budget.max_bytes

        def bounded(*args, **kwargs):
            self.refuse_larger(estimate(limit, obj, *args, **kwargs) * (_GROWTH if isinstance(obj, Markup) else 1))
            return value(*args, **kwargs)

        return bounded

    def getitem(self, obj, argument):
        _check_budget()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text, limit, by_map = value.__self__, self.budget.max_bytes, value.__name__ == "format_map"

        def bounded(*args, **kwargs):
            arguments = ((), args[0] if args else {}) if by_map else (args, kwargs)
            self.refuse_larger(_format_size(text, *arguments, limit) * (_GROWTH if isinstance(text, Markup) else 1))
            return wrapped(*args, **kwargs)

        return bounded

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        _check_budget()
        if isinstance(__obj, LoopContext) and args:  # loop(children) of a recursive loop: its items are steps too
            args = (_steps(args[0]), *args[1:])
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        self.refuse_larger(self._binop_size(operator, left, right))
        return super().call_binop(context, operator, left, right)

    def _binop_size(self, operator: str, left, right) -> int:
        """The size of ``left <operator> right``, from its operands (an int counts its digits)."""
        numbers = isinstance(left, int) and isinstance(right, int)
        if operator == "**":
            return _digits(left.bit_length() * right) if numbers and right > 0 else 0
        if operator == "*":
            if numbers:
                return _digits(left.bit_length() + right.bit_length())
            if isinstance(right, int) and not isinstance(left, int | float):
                return self._size(left) * max(right, 0)
            if isinstance(left, int) and not isinstance(right, int | float):
                return self._size(right) * max(left, 0)
            return 0
        if operator == "%":
            if isinstance(left, str):
                return _printf_size(left, right, self.budget.max_bytes) * (_GROWTH if isinstance(left, Markup) else 1)
            return 0
        if numbers or isinstance(left, float) or isinstance(right, float):  # "+"
            return 0
        return self._size(left) + self._size(right)

    def bounded_concat(self, join, parts: tuple):
        """``a ~ b``: the parts are measured before they are joined. (Not ``concat``: Jinja's compiled code joins
        the output of macros, block sets and recursive loops with ``environment.concat``, ``"".join``.)"""
        self.refuse_larger(sum(self._size(part) for part in parts))
        return join(parts)


class _BoundedConcatGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to ``environment.bounded_concat(...)``, so that the parts are measured before the join."""

    @optimizeconst
    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.bounded_concat({join}, (")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")


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
    """A KID/OCR-style reference: customer and document digits with a check digit the banks verify.

    MOD10 (Luhn) for the Norwegian KID and the Swedish OCR, by python-stdnum. The Finnish reference number
    (viitenumero, weights 7, 3, 1 from the right) stays written out: stdnum has no module for it.
    """
    digits = re.sub(r"\D", "", customer_id) + re.sub(r"\D", "", ref_nbr)
    digits = digits or "0"
    if locale == "fi_FI":
        weights = (7, 3, 1)
        total = sum(int(d) * weights[i % 3] for i, d in enumerate(reversed(digits)))
        return digits + str((10 - total % 10) % 10)
    return digits + kid_check_digit(digits)


def document_label(doc_type: str, formats: Formats) -> str:
    return formats.gettext(DOC_TYPES.get(doc_type, "Invoice"))


# A Factur-X invoice is a PDF and keeps the PDF's name; an EHF document is named like the PDF, with .xml.
EXTENSIONS = {"PDF": "pdf", "HTML": "html", "FACTURX": "pdf", "EHF": "xml"}


def attachment_filename(document: Document, fmt: str, formats: Formats) -> str:
    """``Invoice INV000123.pdf``, ``Kreditnota CRM000045.html``: localised, and safe as a file name."""
    number = re.sub(r"[^A-Za-z0-9._-]", "_", document.ref_nbr)
    return f"{document_label(document.doc_type, formats)} {number}.{EXTENSIONS.get(fmt, fmt.lower())}"


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
    """A header value as RFC 5322 allows it: all whitespace (CR and LF included) folded to single spaces,
    and the other control characters (NUL, ESC, DEL, C1) left out."""
    return " ".join(str(text).translate(_CONTROLS).split())[:limit]


_CONTROLS = {c: None for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if not chr(c).isspace()}


NOTIFICATION_BUDGET = Budget.from_env("INVOICE_MAILING_TEMPLATE", seconds=2.0, max_bytes=1_000_000)
REPORT_BUDGET = Budget.from_env("INVOICE_MAILING_REPORT", seconds=120.0, max_bytes=50_000_000)


class Renderer:
    """One per worker process: the Jinja2 environments, the font configuration and the company."""

    def __init__(self, templates_dir: Path = TEMPLATES_DIR, company_file: Path | None = None,
                 notification_budget: Budget = NOTIFICATION_BUDGET, report_budget: Budget = REPORT_BUDGET):
        self.templates_dir = Path(templates_dir)
        self.report_budget = report_budget
        # Report templates ship with the project, but see the same frozen values under the same rules:
        # measured, the sandbox adds under 1 ms to a document's templating (bench/render.py; the README).
        self.reports = BoundedSandbox(report_budget, loader=FileSystemLoader(self.templates_dir),
                                      autoescape=select_autoescape(("html", "j2", "htm")),
                                      trim_blocks=True, lstrip_blocks=True)
        # Notification templates come from the ERP: anyone with access to its settings can edit them.
        self.notification_budget = notification_budget
        self.notifications = BoundedSandbox(notification_budget, autoescape=True)
        self.subjects = BoundedSandbox(notification_budget, autoescape=False)
        company_file = company_file or Path(os.environ.get("INVOICE_MAILING_COMPANY",
                                                          self.templates_dir / "company.json"))
        self.company = Values("company", json.loads(Path(company_file).read_text(encoding="utf-8")))

    @cached_property
    def font_config(self):
        from weasyprint.text.fonts import FontConfiguration

        return FontConfiguration()

    @cached_property
    def whole_font_characters(self) -> frozenset[str]:
        """The characters a PDF may hold for the shipped fonts to be embedded whole: every character all
        of them draw, when HarfBuzz's subsetter is missing; none when it is there.

        The shipped fonts are subsets already (36 kB each, the Latin an invoice needs). HarfBuzz subsets
        them again in about a millisecond; fontTools, WeasyPrint's fallback, takes some 30 ms a document
        for the same 25 kB. Without HarfBuzz a document whose every character the shipped fonts draw
        embeds them whole (``full_fonts``); any other character may bring a system font, which is then
        subset as usual."""
        from weasyprint.pdf import fonts
        from weasyprint.text.ffi import harfbuzz

        if fonts.harfbuzz_subset and harfbuzz.hb_version_atleast(4, 1, 0):
            return frozenset()
        from fontTools.ttLib import TTFont

        shipped = [frozenset(map(chr, TTFont(path).getBestCmap()))
                   for path in sorted((self.templates_dir / "fonts").glob("*.ttf"))]
        return frozenset.intersection(*shipped) | frozenset("\n\r\t") if shipped else frozenset()

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
                         formats: Formats, address: CustomerAddress | None = None) -> dict:
        """What a report template sees; a notification template sees the same less the labels.

        Each value has its friendly name and, where the ERP has a column for it, the column's name too
        (``document.number`` is ``document.ref_nbr``): the README lists them all.
        """
        try:  # the one model of the document's numbers, which the PDF, the CII and the UBL all show
            numbers = einvoice.figures(document)
        except einvoice.EInvoiceError as exc:
            raise RenderError(f"{document.doc_type} {document.ref_nbr}: {exc}") from exc
        vat_rows = [Values("document.vat_breakdown[]", rate=formats.percent(row.rate), basis=formats.amount(row.basis),
                           vat=formats.amount(row.vat))
                    for row in numbers.rates]
        lines = [
            Values("line", nbr=line.line_nbr, line_nbr=line.line_nbr, description=line.description,
                   quantity=formats.quantity(line.quantity), unit_price=formats.amount(line.unit_price),
                   vat_rate=formats.percent(line.vat_rate), amount=formats.amount(line.net))
            for line in numbers.lines
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
            total_excl_vat=formats.amount(numbers.total_excl_vat),
            total_vat=formats.amount(numbers.vat_total), vat_amount=formats.amount(numbers.vat_total),
            rounding=formats.amount(numbers.rounding) if numbers.rounding else None,
            amount=formats.amount(numbers.payable), total=formats.money(numbers.payable, document.currency),
        )
        return {
            "document": values,
            "doc": values,
            "customer": Values("customer", number=customer.customer_id, customer_id=customer.customer_id,
                               name=customer.name, locale=formats.locale),
            "attention": attention,
            "company": self.company,
            "buyer": parties.buyer(address, formats.locale, self.company.get("country_code")),
            "seller": parties.seller(self.company, formats.locale, address.country_code if address else None),
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
                   fmt: str, locale: str | None, report_id: str | None = None,
                   address: CustomerAddress | None = None) -> Attachment:
        """The document as the customer receives it: a PDF, a self-contained HTML file, or an e-invoice
        (``FACTURX``: the PDF with its CII embedded; ``EHF``: UBL with the PDF embedded), which is valid by
        the EN 16931 rules or is not made at all (a RenderError that names the broken rules)."""
        return self.start_attachment(document, customer, attention, template_name, fmt, locale, report_id,
                                     address)()

    def start_attachment(self, document: Document, customer: Customer, attention: str | None, template_name: str,
                         fmt: str, locale: str | None, report_id: str | None = None,
                         address: CustomerAddress | None = None) -> Callable[[], Attachment]:
        """``attachment()`` in two steps: this renders, and starts an e-invoice's EN 16931 check; the function it
        returns waits for the check and gives the attachment, or raises the RenderError that names the broken
        rules. In a worker the check runs in its validator process, so the caller can render the next document
        meanwhile; it must call the function, and have the attachment, before it claims anything."""
        formats = Formats(locale)
        context = self.document_context(document, customer, attention, formats, address)
        html = self.report_html(template_name, context, for_pdf=fmt != "HTML", formats=formats)
        name = attachment_filename(document, fmt, formats)
        if fmt == "HTML":
            return partial(Attachment, name, html.encode("utf-8"), "text", "html")
        if fmt == "PDF":
            return partial(Attachment, name, self.pdf(html, template_name, report_id), "application", "pdf")
        if fmt not in E_INVOICE_FORMATS:
            raise RenderError(f"format {fmt!r} is not one the pipeline can render")
        from include.invoice_mailing import einvoice_check

        def invalid(exc: einvoice.EInvoiceError) -> RenderError:
            return RenderError(f"{fmt} for {document.doc_type} {document.ref_nbr} is not valid by EN 16931: {exc}")

        try:
            invoice = einvoice.build(document, customer, address, self.company, context["payment_reference"])
            if fmt == "FACTURX":  # the CII is checked while its PDF renders
                xml = einvoice.to_cii(invoice)
                verdict = einvoice_check.valid_later(xml, "CII")
                made = Attachment(name, self.pdf(html, template_name, report_id, factur_x=xml), "application", "pdf")
            else:
                pdf = self.pdf(html, template_name, report_id)
                xml = einvoice.to_ubl(invoice, pdf, attachment_filename(document, "PDF", formats))
                verdict = einvoice_check.valid_later(xml, "UBL")
                made = Attachment(name, xml, "application", "xml")
        except einvoice.EInvoiceError as exc:
            raise invalid(exc) from exc

        def checked() -> Attachment:
            try:
                verdict()
            except einvoice.EInvoiceError as exc:
                raise invalid(exc) from exc
            return made

        return checked

    def pdf(self, html: str, template_name: str, report_id: str | None = None, factur_x: bytes | None = None) -> bytes:
        """The report as PDF; with ``factur_x``, as PDF/A-3b with that CII embedded as ``factur-x.xml``."""
        from weasyprint import HTML

        options = self.report_settings.get(report_id or "", {})
        whole = self.whole_font_characters
        extra = {"pdf_variant": options.get("pdf_variant")}
        if factur_x is not None:
            extra = {"pdf_variant": "pdf/a-3b", "attachments": [facturx_pdf.attachment(factur_x)],
                     "finisher": facturx_pdf.finish}
        return HTML(string=html, base_url=str(self.templates_dir)).write_pdf(
            stylesheets=self.stylesheets(template_name), font_config=self.font_config,
            full_fonts=bool(whole) and set(html) <= whole, **extra)

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
