"""Locales: gettext catalogs for labels, Babel for numbers, money and dates."""

from __future__ import annotations

import logging
import re
from datetime import date
from decimal import Decimal
from functools import lru_cache
from io import BytesIO
from pathlib import Path

from babel.core import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_currency, format_decimal
from babel.support import Translations

log = logging.getLogger(__name__)

LOCALE_DIR = Path(__file__).resolve().parents[1] / "templates" / "locale"
SUPPORTED = ("en_GB", "nb_NO", "sv_SE", "da_DK", "fi_FI", "nl_NL")  # locales with a catalog of labels
FALLBACK = "en_GB"


@lru_cache(maxsize=64)
def resolve_locale(name: str | None) -> str:
    """The locale to format for: any locale Babel knows (``de_DE``, ``nb-NO``), else en_GB with a warning."""
    candidate = (name or "").replace("-", "_").strip()
    try:
        return str(Locale.parse(candidate)) if candidate else FALLBACK
    except (ValueError, UnknownLocaleError):
        log.warning("Locale %r is unknown; formatting for %s instead", name, FALLBACK)
        return FALLBACK


@lru_cache(maxsize=64)
def catalog_locale(locale: str) -> str:
    """The catalog the labels come from: the locale's own, its language's, else en_GB with a warning."""
    language = locale.split("_")[0]
    for candidate in (locale, *(s for s in SUPPORTED if s.split("_")[0] == language)):
        if candidate in SUPPORTED:
            return candidate
    log.warning("No catalog for locale %r: labels in %s, numbers and dates for %s", locale, FALLBACK, locale)
    return FALLBACK


@lru_cache(maxsize=16)
def translations(locale: str) -> Translations:
    """The compiled catalog (``make`` compiles it); the .po source is compiled in memory if the .mo is missing."""
    folder = LOCALE_DIR / locale / "LC_MESSAGES"
    mo, po = folder / "messages.mo", folder / "messages.po"
    if mo.exists() and (not po.exists() or mo.stat().st_mtime >= po.stat().st_mtime):
        with mo.open("rb") as fh:
            return Translations(fh)
    if po.exists():
        with po.open("rb") as fh:
            catalog = read_po(fh, locale=locale)
        buffer = BytesIO()
        write_mo(buffer, catalog)
        buffer.seek(0)
        return Translations(buffer)
    return Translations()  # en_GB: the message ids are the English labels


class Formats:
    """Everything locale-dependent that a template shows, bound to one locale."""

    def __init__(self, locale: str | None):
        self.locale = resolve_locale(locale)  # numbers, money and dates: Babel knows every CLDR locale
        self._translations = translations(catalog_locale(self.locale))

    def gettext(self, message: str, **values) -> str:
        text = self._translations.gettext(message)
        return text.format(**values) if values else text

    def amount(self, value: Decimal | float | int | None) -> str:
        return format_decimal(value or 0, "#,##0.00", locale=self.locale)

    def money(self, value: Decimal | float | int | None, currency: str) -> str:
        text = format_currency(value or 0, currency, locale=self.locale)
        # CLDR's currency spacing, which Babel leaves out: "NOK 1,234.50", not "NOK1,234.50".
        return re.sub(r"(?<=\d)(?=[A-Z]{3}$)", "\u00a0", re.sub(r"^(-?[A-Z]{3})(?=[-\d])", "\\1\u00a0", text))

    def quantity(self, value: Decimal | float | int | None) -> str:
        return format_decimal(value or 0, "#,##0.####", locale=self.locale)

    def percent(self, value: Decimal | float | int | None) -> str:
        return format_decimal(value or 0, "0.##", locale=self.locale) + " %"

    def date(self, value: date | None) -> str:
        return format_date(value, "short", locale=self.locale) if value else ""
