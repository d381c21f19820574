"""An operator's run parameters and the night's context: parsed, and refused if wrong, once, at the edge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from email_validator import EmailNotValidError

from include.invoice_mailing import rules
from include.invoice_mailing.clock import TIMEZONE, naive_utc

__all__ = ["TIMEZONE", "ParamError", "RunContext", "RunParams", "naive_utc"]


class ParamError(ValueError):
    """An operator's run parameter is wrong: the run stops before anything is read or sent."""


@dataclass(frozen=True)
class RunParams:
    dry_run: bool = False
    redirect_to: str | None = None
    customers: tuple[str, ...] = ()
    documents: tuple[str, ...] = ()
    resend: bool = False
    lookback_days: int = 30
    lift_bounces: tuple[str, ...] = ()  # addresses mailed again tonight although they hard-bounced

    @classmethod
    def from_params(cls, params: dict) -> RunParams:
        def names(key):
            value = params.get(key) or ()
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if not all(isinstance(v, str | int) for v in value):
                raise ParamError(f"{key} must be a list of numbers, got {value!r}")
            return tuple(str(v).strip() for v in value if str(v).strip())

        redirect = (params.get("redirect_to") or "").strip() or None
        if redirect:
            try:
                redirect = rules.normalize_address(redirect)
            except EmailNotValidError as exc:
                raise ParamError(f"redirect_to is not a valid address: {exc}") from exc
        raw_lookback = params.get("lookback_days")
        try:
            lookback = 30 if raw_lookback is None else int(raw_lookback)
        except (TypeError, ValueError) as exc:
            raise ParamError(f"lookback_days must be a whole number, got {raw_lookback!r}") from exc
        if lookback < 0:
            raise ParamError("lookback_days cannot be negative")
        lifted = []
        for address in names("lift_bounces"):
            try:
                lifted.append(rules.normalize_address(address))
            except EmailNotValidError as exc:
                raise ParamError(f"lift_bounces: {address!r} is not a valid address: {exc}") from exc
        return cls(dry_run=bool(params.get("dry_run")), redirect_to=redirect, customers=names("customers"),
                   documents=names("documents"), resend=bool(params.get("resend")), lookback_days=lookback,
                   lift_bounces=tuple(lifted))

    @property
    def mode(self) -> str:
        """Dry runs and redirected test runs keep their own ledger rows: they never count as delivered."""
        if self.dry_run:
            return "dry_run"
        return "redirect" if self.redirect_to else "live"


@dataclass(frozen=True)
class RunContext:
    run_id: str
    run_date: date            # the night's date D, in the DAG's time zone
    released_before: datetime  # the data interval's end: documents released before it are due
    params: RunParams

    @classmethod
    def from_airflow(cls, run_id: str, logical_date: datetime | None, data_interval_end: datetime | None,
                     params: dict) -> RunContext:
        end = data_interval_end or logical_date or datetime.now(TIMEZONE)
        return cls(run_id=run_id, run_date=(logical_date or end).astimezone(TIMEZONE).date(),
                   released_before=end, params=RunParams.from_params(params))

    @property
    def released_since(self) -> datetime | None:
        """The look-back window's start; an operator naming documents gets them whatever their age."""
        if self.params.documents:
            return None
        return datetime.combine(self.run_date - timedelta(days=self.params.lookback_days), time(0), TIMEZONE)
