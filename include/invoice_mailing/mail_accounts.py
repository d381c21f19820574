"""The deployer's check before the first night: every email account of the ERP logs in; nothing is sent.

``make check-mail-accounts`` (``python -m include.invoice_mailing.mail_accounts``), with the Airflow
connections of the deployment (its metadata database, or ``AIRFLOW_CONN_*``). For each SMTP connection
the ERP's email accounts name (``email_account.smtp_conn_id``, else ``smtp_default``) it reads the
connection, gets its OAuth 2.0 token where it has one, opens the SMTP session as a night would (TLS,
then AUTH), and quits before any MAIL FROM; then the bounce mailbox ``mailing_bounces``, when it is set:
its token, the IMAP login, its folder. One line each, ``ok`` or why not, never a secret; the exit
status is 1 when any line is not ok.
"""

from __future__ import annotations

import argparse
import smtplib
import sys
from collections import defaultdict
from dataclasses import dataclass

from include.invoice_mailing.deliver import DEFAULT_SMTP_CONN_ID
from include.invoice_mailing.rules import EmailAccount
from include.invoice_mailing.smtp_login import (
    MAILBOX,
    SmtpAccount,
    SmtpAccountError,
    SmtpConfigError,
    TransientSmtpError,
)

OK, WARNING, FAILED = "ok", "warning", "FAILED"


@dataclass(frozen=True)
class Checked:
    what: str
    status: str   # OK, WARNING (it logs in, but a night may still be refused) or FAILED
    said: str

    @property
    def ok(self) -> bool:
        return self.status != FAILED

    def __str__(self) -> str:
        return f"{self.what}: {self.status}: {self.said}"


def check_smtp(conn_id: str, accounts: list[EmailAccount], *, bounces: bool = False) -> list[Checked]:
    """Log in as the connection says and quit; a line for the connection, and a warning line for an account
    whose address is not the mailbox a platform that checks the sender will let it send as."""
    names = ", ".join(f"{a.account_id} <{a.address}>" for a in accounts)
    what = f"SMTP connection {conn_id!r} (email account{'s' if len(accounts) > 1 else ''} {names})"
    try:
        account = SmtpAccount.from_connection(conn_id)
        token = account.token()
        client = account.open(token)
    except (SmtpConfigError, SmtpAccountError, TransientSmtpError) as exc:
        reason = getattr(exc, "reason", "config_error" if isinstance(exc, SmtpConfigError) else "try again later")
        return [Checked(what, FAILED, f"{reason}: {exc}")]
    except (OSError, smtplib.SMTPException) as exc:
        return [Checked(what, FAILED, f"cannot reach {account.host}:{account.port}: {type(exc).__name__}: {exc}")]
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        client.close()
    how = (f"OAuth 2.0 ({account.tokens.provider}) as {account.tokens.settings.user}" if account.tokens
           else f"password login as {account.login}" if account.login else "no login")
    sender = ("; envelope sender: " + ("the mailbox's own address" if account.envelope_sender == MAILBOX else "VERP")
              if bounces else "")  # without the bounce mailbox every connection sends with the account's address
    checked = [Checked(what, OK, f"logged in at {account.host}:{account.port}, {how}{sender}")]
    mailbox = (account.tokens.settings.user if account.tokens else account.login or "").casefold()
    if account.platform and mailbox:
        for a in accounts:
            if a.address.casefold() != mailbox:
                checked.append(Checked(f"email account {a.account_id} <{a.address}>", WARNING,
                                       f"{account.platform} sends as {mailbox} only, unless that mailbox "
                                       f"has Send As for {a.address} (else 554 5.2.252 SendAsDenied)"))
    return checked


def check_bounce_mailbox(settings) -> Checked:
    """The bounce mailbox's login and folder."""
    from include.invoice_mailing.bounce_mailbox import BounceMailbox, MailboxUnavailable

    try:
        with BounceMailbox.from_connection(settings.conn_id) as mailbox:
            return Checked(settings.where, OK, f"logged in; {mailbox.count} message(s) in {settings.folder}")
    except MailboxUnavailable as exc:
        return Checked(settings.where, FAILED, str(exc).removeprefix(f"{settings.where}: "))


def check(erp_engine) -> list[Checked]:
    from include.invoice_mailing import source
    from include.invoice_mailing.bounce_mailbox import MailboxUnavailable, mailbox_settings

    try:
        bounces, unreadable = mailbox_settings(), None
    except MailboxUnavailable as exc:
        bounces, unreadable = None, Checked("bounce mailbox", FAILED, str(exc))
    by_connection: dict[str, list[EmailAccount]] = defaultdict(list)
    for account in source.email_accounts(erp_engine):
        by_connection[account.smtp_conn_id or DEFAULT_SMTP_CONN_ID].append(account)
    checked = [line for conn_id, accounts in sorted(by_connection.items())
               for line in check_smtp(conn_id, accounts, bounces=bounces is not None or unreadable is not None)]
    if not by_connection:
        checked.append(Checked("email accounts", FAILED, "the ERP has no email_account rows: no mailing can send"))
    if bounces is not None:
        checked.append(check_bounce_mailbox(bounces))
    return checked + ([unreadable] if unreadable else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    from include.invoice_mailing.tasks import ERP_CONN_ID, engine_for

    lines = check(engine_for(ERP_CONN_ID))
    for line in lines:
        print(line, flush=True)
    return 0 if all(line.ok for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
