"""The approval brake: a night far larger than usual, or a resend of everything, waits for a person.

A wrong ERP export or a fat-fingered parameter could mail every customer at once. Before anything
is sent, ``approve_night`` (``approval.NightApproval``) compares tonight's volume with the nights
before it; when this module finds a reason, the night waits for an Approve or a Reject in Airflow's
Required Actions. These are the pure rules; the ledger keeps the volumes and the decisions.

- A live night whose documents, or whose total in any currency, is more than
  ``INVOICE_MAILING_BRAKE_FACTOR`` (3) times the median of the last 14 nights that mailed documents;
  with no such night yet, more than ``INVOICE_MAILING_BRAKE_FIRST`` (500) documents.
- Every live ``resend`` that names neither ``documents`` nor ``customers``.
- Dry runs and runs redirected to a test address mail no customer: they never wait.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from include.invoice_mailing.dag_settings import brake_timeout

NIGHTS = 14


@dataclass(frozen=True)
class Volume:
    """What a night is about to mail: documents, customers, and the documents' total per currency."""

    documents: int
    customers: int
    totals: dict[str, Decimal] = field(default_factory=dict)

    @classmethod
    def of(cls, documents) -> Volume:
        """The volume of extract's due documents (``source.DueDocument``)."""
        totals: dict[str, Decimal] = {}
        customers = set()
        count = 0
        for d in documents:
            count += 1
            customers.add(d.customer_id)
            if d.currency:
                totals[d.currency] = totals.get(d.currency, Decimal(0)) + abs(Decimal(d.amount))
        return cls(count, len(customers), dict(sorted(totals.items())))

    def as_json(self) -> dict:
        return {"documents": self.documents, "customers": self.customers,
                "totals": {c: str(t) for c, t in self.totals.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Volume:
        return cls(int(data.get("documents") or 0), int(data.get("customers") or 0),
                   {c: Decimal(t) for c, t in (data.get("totals") or {}).items()})


@dataclass(frozen=True)
class BrakeSettings:
    factor: float = 3.0
    first: int = 500
    timeout: timedelta = timedelta(hours=4)

    @classmethod
    def from_env(cls) -> BrakeSettings:
        """INVOICE_MAILING_BRAKE_FACTOR, INVOICE_MAILING_BRAKE_FIRST, INVOICE_MAILING_BRAKE_TIMEOUT (seconds)."""
        return cls(factor=float(os.environ.get("INVOICE_MAILING_BRAKE_FACTOR", "3")),
                   first=int(os.environ.get("INVOICE_MAILING_BRAKE_FIRST", "500")),
                   timeout=brake_timeout())


@dataclass(frozen=True)
class Comparison:
    """Tonight against the nights before: the medians and why (if at all) the night must wait."""

    volume: Volume
    nights: int
    median_documents: float | None
    median_totals: dict[str, Decimal]
    reasons: tuple[str, ...]

    @property
    def braked(self) -> bool:
        return bool(self.reasons)

    def as_json(self) -> dict:
        return {**self.volume.as_json(), "nights": self.nights, "median_documents": self.median_documents,
                "median_totals": {c: str(t) for c, t in self.median_totals.items()}, "reasons": list(self.reasons)}


def compare(volume: Volume, history: Sequence[Volume], *, mode: str, resend: bool, scoped: bool,
            settings: BrakeSettings) -> Comparison:
    """Tonight's ``volume`` against ``history`` (the last nights that mailed documents, newest first).

    ``scoped``: the run names documents or customers. Only a live run (mode ``live``) can be braked."""
    nights = [v for v in history if v.documents > 0][:NIGHTS]
    median_documents = statistics.median(v.documents for v in nights) if nights else None
    currencies = sorted({c for v in nights for c in v.totals})
    median_totals = {c: Decimal(statistics.median(v.totals[c] for v in nights if c in v.totals))
                     for c in currencies}
    reasons: list[str] = []
    if mode == "live" and volume.documents:
        if resend and not scoped:
            reasons.append("a resend of every due document (it names no documents and no customers)")
        if median_documents is None:
            if volume.documents > settings.first:
                reasons.append(f"{volume.documents} documents and no earlier night to compare with "
                               f"(the limit is {settings.first})")
        else:
            if volume.documents > settings.factor * median_documents:
                reasons.append(f"{volume.documents} documents, more than {settings.factor:g} × the median "
                               f"{median_documents:g} of the last {len(nights)} nights")
            for currency, total in volume.totals.items():
                median = median_totals.get(currency)
                if median is not None and total > Decimal(str(settings.factor)) * median:
                    reasons.append(f"{currency} {total} in all, more than {settings.factor:g} × the median "
                                   f"{currency} {median} of the last {len(nights)} nights")
    return Comparison(volume, len(nights), median_documents, median_totals, tuple(reasons))


def request_text(run_id: str, comparison: Comparison, params: dict, settings: BrakeSettings) -> tuple[str, str]:
    """Subject and Markdown body of the approval request: the numbers an approver decides on."""
    v = comparison.volume
    subject = f"Invoice mailing {run_id}: approve mailing {v.documents} documents to {v.customers} customers?"
    totals = "\n".join(f"| {c} | {t:,.2f} | {_money(comparison.median_totals.get(c))} |" for c, t in v.totals.items())
    median = "no earlier night" if comparison.median_documents is None else f"{comparison.median_documents:g}"
    shown = ", ".join(f"{k}={json.dumps(value)}" for k, value in params.items()
                      if value not in (None, [], "", False)) or "none (a normal night)"
    body = "\n".join([
        "This night is held before anything is sent, because of:",
        "",
        *[f"- {reason}" for reason in comparison.reasons],
        "",
        "| | tonight | median of the last nights |",
        "|---|---:|---:|",
        f"| documents | {v.documents} | {median} |",
        f"| customers | {v.customers} | |",
        "",
        "| currency | total tonight | median |",
        "|---|---:|---:|",
        totals or "| - | - | - |",
        "",
        f"Compared with {comparison.nights} night{'' if comparison.nights == 1 else 's'} (the last {NIGHTS} that "
        f"mailed documents). Run parameters: {shown}.",
        "",
        f"**Approve** mails them now. **Reject** mails nothing and ends the night failed; so does no answer "
        f"within {_hours(settings.timeout)}. Either way the ledger records the decision.",
    ])
    return subject, body


def _money(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _hours(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"
