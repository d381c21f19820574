"""Read the bounce mailbox and apply its reports to the ledger (docs/rules.md, rule 9): what ``collect_bounces`` does.

One pass over the folder: each message is read (``bounces.read_report``); a bounce or a delay that
names a delivery of this ledger is applied (``bounce_apply.apply_report``, which keeps the raw report)
and then moved to the processed folder. Everything else (an auto-reply, a person's answer, a report
that cannot be read or names no delivery, a forged VERP address) stays where it is, unread, with one
log line. The order is apply, then move: a session lost in between leaves an applied report in the
folder, and the next pass finds it ``already_applied`` and moves it then.

Two readers at once (the night and the hourly DAG) are harmless to the ledger: a report is applied
once per delivery, by the unique key (report hash, delivery). The hourly DAG still does not read
while a night runs (see ``dags/invoice_mailing_bounces.py``), so that two sessions do not race for
the same message's move.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from include.invoice_mailing import ledger
from include.invoice_mailing.bounce_apply import apply_report
from include.invoice_mailing.bounce_mailbox import BounceMailbox, MailboxUnavailable
from include.invoice_mailing.bounces import Kind, read_report
from include.invoice_mailing.masking import mask_text

log = logging.getLogger(__name__)

BUDGET = timedelta(minutes=10)
"""How long one pass reads: the messages not reached by then wait for the next pass (the hourly DAG's, or the
next night's), and the night goes on to mail. The tasks' ``execution_timeout`` (30 minutes) is only the backstop."""


@dataclass
class Collected:
    """What one pass over the mailbox did, for the task's XCom and the night's log."""

    read: bool = True        # False: the mailbox could not be read (``why`` says why) or is not configured
    why: str | None = None
    messages: int = 0        # messages read (those above the size limit are not counted: they were not read)
    bounced: int = 0         # deliveries moved to bounced
    noted: int = 0           # delays (or a second report on a bounced delivery) noted
    moved: int = 0           # reports moved to the processed folder
    left: int = 0            # messages left in the folder, unread (those above the size limit too)
    quarantined: list[str] = field(default_factory=list)  # "UID 7: why", moved to the quarantine folder
    read_before: int = 0     # messages left in the folder by an earlier pass, for good: not fetched again
    stopped: str | None = None  # why the pass ended before the folder's last message (its time budget)

    def as_xcom(self) -> dict:
        return asdict(self)


def collect(engine: Engine, mailbox: BounceMailbox, *, key: bytes | None, run_id: str | None,
            budget: timedelta = BUDGET) -> Collected:
    """Apply every report of the mailbox's folder that names a delivery, and move it; leave the rest. The pass
    ends after ``budget``, between two messages."""
    done = Collected()
    where, folder = mailbox.settings.where, mailbox.settings.folder
    deadline = time.monotonic() + budget.total_seconds()
    read_before = (ledger.mailbox_messages_read(engine, mailbox.key, mailbox.uidvalidity)
                   if mailbox.uidvalidity is not None else set())
    for message in mailbox.messages(skip=read_before):
        if time.monotonic() > deadline:
            done.stopped = (f"stopped after {budget.total_seconds() / 60:g} minutes, at UID {message.uid}: the "
                            "messages from there on wait for the next pass")
            log.warning("%s: %s", where, done.stopped)
            break
        done.messages += 1
        try:
            _collect_one(engine, mailbox, message, key=key, run_id=run_id, done=done)
        except (MailboxUnavailable, OperationalError, InterfaceError):
            raise  # the mailbox or the ledger is unreachable: the pass ends, the caller says so, nothing is moved
        except Exception as exc:  # noqa: BLE001 - one message that cannot be applied must not stop every night
            said = str(exc).strip().splitlines()
            why = f"UID {message.uid}: {type(exc).__name__}: {said[0] if said else 'no message'}"
            log.warning("%s: %s; the message goes to %s for a person to look at", where, mask_text(why),
                        mailbox.settings.quarantine_folder)
            mailbox.quarantined(message.uid)
            done.quarantined.append(mask_text(why)[:300])
    done.left += len(mailbox.too_large)  # not read, and left in the folder all the same
    done.read_before = len(read_before & mailbox.uids)
    log.info("%s: %d message(s) read, %d delivery(ies) bounced, %d noted, %d report(s) moved to %s, %d left in %s, "
             "%d quarantined, %d left there by an earlier pass (not read again)", where, done.messages, done.bounced,
             done.noted, done.moved, mailbox.settings.processed_folder, done.left, folder, len(done.quarantined),
             done.read_before)
    return done


def _collect_one(engine: Engine, mailbox: BounceMailbox, message, *, key: bytes | None, run_id: str | None,
                 done: Collected) -> None:
    where, folder = mailbox.settings.where, mailbox.settings.folder
    report = read_report(message.raw, size=message.size)
    if not report.is_bounce:
        done.left += 1
        # An auto-reply or a person's answer is expected there; a message that cannot be read is worth a look.
        level = logging.WARNING if report.kind == Kind.UNREADABLE else logging.INFO
        log.log(level, "%s: UID %d left in %s, unread: %s (%s)", where, message.uid, folder, report.kind.value,
                mask_text(report.reason))
        if mailbox.uidvalidity is not None:  # what it is cannot change: the next pass need not parse it again
            ledger.remember_mailbox_message(engine, mailbox.key, mailbox.uidvalidity, message.uid,
                                            report.kind.value, mask_text(report.reason))
        return
    outcomes = apply_report(engine, report, message.raw, bounce_address=mailbox.settings.address, key=key,
                            run_id=run_id)
    if not any(outcome.applied for outcome in outcomes):
        done.left += 1
        log.warning("%s: UID %d left in %s, unread: a %s report not applied: %s", where, message.uid, folder,
                    report.kind.value, mask_text("; ".join(outcome.reason for outcome in outcomes)))
        return
    done.bounced += sum(outcome.effect == "bounced" for outcome in outcomes)
    done.noted += sum(outcome.effect == "noted" for outcome in outcomes)
    mailbox.processed(message.uid)
    done.moved += 1
