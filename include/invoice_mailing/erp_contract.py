"""The ERP contract, checked before a night reads anything: every table and column the project reads is there.

The contract is the tables of ``source.erp`` (the columns the pipeline reads, from
``sql/erp_source.sql``); ``docs/erp-contract.md`` explains each for the person who feeds the ERP's data.
An optional table may be absent (its feature is then off: without ``customer_address`` the documents go
without the buyer's address, and e-invoices fail for want of it); present, it must be whole. A night
against an ERP that lacks a column would otherwise fail in every mapped instance with the database's
own words and its SQL, so ``open_night`` checks it and fails the night at once, with one line.
"""

from __future__ import annotations

from sqlalchemy import Engine, inspect

from include.invoice_mailing import source

DOCS = "docs/erp-contract.md"
OPTIONAL_TABLES = ("customer_address",)  # the features they carry are off without them
WRITTEN_BACK = ("invoice.emailed",)        # the only column the project may change (INVOICE_MAILING_WRITE_BACK)


class ErpContractError(RuntimeError):
    """The ERP database lacks a table or a column of the contract: one line naming the connection and each."""


def missing(engine: Engine) -> dict[str, list[str]]:
    """Table -> the contract's columns it lacks (all of them: the table is missing); empty when whole.
    An optional table that is absent is not listed."""
    with engine.connect() as conn:
        found = inspect(conn)
        tables = {name.lower() for name in found.get_table_names()} | {name.lower() for name in found.get_view_names()}
        lacking: dict[str, list[str]] = {}
        for table in source.erp.sorted_tables:
            if table.name not in tables:
                if table.name not in OPTIONAL_TABLES:
                    lacking[table.name] = [c.name for c in table.columns]
                continue
            have = {c["name"].lower() for c in found.get_columns(table.name)}
            gaps = [c.name for c in table.columns if c.name not in have]
            if gaps:
                lacking[table.name] = gaps
    return lacking


def check(engine: Engine, conn_id: str) -> None:
    """Raise ErpContractError when the ERP lacks part of the contract."""
    lacking = missing(engine)
    if not lacking:
        return
    required = [t.name for t in source.erp.sorted_tables if t.name not in OPTIONAL_TABLES]
    if all(lacking.get(t) == [c.name for c in source.erp.tables[t].columns] for t in required):
        raise ErpContractError(f"the database of connection {conn_id!r} holds none of the tables the project reads "
                               f"(customer, invoice, ...): is it the ERP's database? (the contract: {DOCS})")
    parts = []
    for table, columns in lacking.items():
        whole = [c.name for c in source.erp.tables[table].columns]
        parts.append(f"no table {table}" if columns == whole else
                     f"table {table} lacks column{'s' if len(columns) > 1 else ''} {', '.join(columns)}")
    raise ErpContractError(f"the ERP database of connection {conn_id!r} does not hold the tables the project reads: "
                           f"{'; '.join(parts)} (the contract: {DOCS})")
