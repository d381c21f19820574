"""The bounce mailbox (docs/rules.md, rule 9): read the reports in the ``mailing_bounces`` IMAP folder, move applied ones.

The IMAP provider's hook opens the session (host, port, login, password, extra ``use_ssl`` and
``ssl_context``); everything after the login is plain IMAP here, because the provider's own helpers
look for attachments and decode bodies as UTF-8, where a report must be read as the exact bytes the
server holds. Reading never changes a message: bodies are fetched with ``BODY.PEEK[]`` (no ``\\Seen``),
and only :meth:`BounceMailbox.processed` moves one message, by its UID, to the processed folder.
Nothing here deletes a report, and nothing expunges a message it did not move itself: no plain
EXPUNGE, and no CLOSE either (CLOSE expunges every message flagged ``\\Deleted``, someone else's too).
"""

from __future__ import annotations

import imaplib
import logging
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from include.invoice_mailing.bounces import READ_BYTES

BOUNCES_CONN_ID = "mailing_bounces"
# A report is small: a DSN with headers only is a few kB, with the returned message a few MB. A message
# far beyond that is not read into memory (it stays in the folder, unread, with a log line).
SIZE_LIMIT = 10 * 1024 * 1024
# An answer the server does not send within this many seconds ends the session: a night does not hang on
# its mailbox. (The hook opens the connection without a time-out; this applies from the greeting on.)
TIMEOUT = 60

log = logging.getLogger(__name__)


class MailboxUnavailable(Exception):
    """The bounce mailbox cannot be read or changed: the server is down, refuses the login, or lacks a
    folder. The message is one line, for the night's log and alert; the night mails all the same."""


@dataclass(frozen=True)
class MailboxSettings:
    """The connection's settings that are this module's: the extras rule 9 of docs/rules.md names."""

    conn_id: str
    host: str
    port: int
    login: str
    address: str            # the bounce address (VERP's base); default: the login
    folder: str             # where reports arrive; default INBOX
    processed_folder: str   # where applied reports go; default Processed, created when missing
    quarantine_folder: str = "Quarantine"  # reports that could not be applied (never deleted); created when missing

    @classmethod
    def from_connection(cls, conn) -> MailboxSettings:
        extra = conn.extra_dejson
        use_ssl = extra.get("use_ssl", True)  # the hook's default
        settings = cls(conn_id=conn.conn_id, host=conn.host or "", port=conn.port or (993 if use_ssl else 143),
                       login=conn.login or "", address=extra.get("address") or conn.login or "",
                       folder=extra.get("folder") or "INBOX",
                       processed_folder=extra.get("processed_folder") or "Processed",
                       quarantine_folder=extra.get("quarantine_folder") or "Quarantine")
        for name in (settings.folder, settings.processed_folder, settings.quarantine_folder):
            if not name.isascii():  # IMAP names other characters in modified UTF-7, which imaplib does not do
                raise MailboxUnavailable(f"{settings.where}: folder name {name!r} is not ASCII: rename the folder")
        return settings

    @property
    def where(self) -> str:
        """How log lines and errors name the mailbox."""
        return f"bounce mailbox {self.conn_id} ({self.login}@{self.host}:{self.port})"


def mailbox_settings(conn_id: str = BOUNCES_CONN_ID) -> MailboxSettings | None:
    """The connection's settings, or None when Airflow has no such connection (then the night sends with
    the email account's address as MAIL FROM and reads no bounces)."""
    from airflow.providers.imap.hooks.imap import ImapHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return MailboxSettings.from_connection(ImapHook.get_connection(conn_id))
    except AirflowNotFoundException:
        return None


class MailboxMessage(NamedTuple):
    uid: int      # the message's UID in the folder (stable for this session; UIDVALIDITY is not kept)
    size: int     # RFC822.SIZE, in bytes
    raw: bytes    # the message exactly as the server holds it: its first ``READ_BYTES`` when it is larger


class BounceMailbox:
    """One IMAP session on the report folder, selected read-write (a move needs it)."""

    def __init__(self, client: imaplib.IMAP4, settings: MailboxSettings, size_limit: int = SIZE_LIMIT):
        self.client = client
        self.settings = settings
        self.size_limit = size_limit
        self.capabilities = self._capabilities()
        self.too_large: list[int] = []  # the UIDs :meth:`messages` left unread for their size
        self.uids: set[int] = set()  # the folder's UIDs when :meth:`messages` listed them
        self._folders_ready: set[str] = set()
        selected = self._call("select the folder", f"folder {settings.folder!r} cannot be opened",
                              client.select, _quoted(settings.folder))
        self.count = int(selected[0])  # the messages in the folder (EXISTS) when it was opened
        # With the UID, it names one message for ever (RFC 3501); a server that sends none: every pass reads all.
        _, validity = client.response("UIDVALIDITY")
        self.uidvalidity = int(validity[-1]) if validity and validity[-1] else None

    @classmethod
    @contextmanager
    def from_connection(cls, conn_id: str = BOUNCES_CONN_ID, size_limit: int = SIZE_LIMIT) -> Iterator[BounceMailbox]:
        """Open the mailbox of an Airflow IMAP connection; MailboxUnavailable when it cannot be."""
        from airflow.providers.imap.hooks.imap import ImapHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        hook = ImapHook(imap_conn_id=conn_id)
        try:
            conn = hook.get_connection(conn_id)
        except AirflowNotFoundException:
            raise MailboxUnavailable(f"bounce mailbox {conn_id}: Airflow has no connection {conn_id!r}") from None
        settings = MailboxSettings.from_connection(conn)
        if conn.extra_dejson.get("auth_type") == "oauth2":
            client = _oauth_session(conn, settings)
        elif not (conn.password or "").isascii() or not (conn.login or "").isascii():
            client = _plain_session(conn, settings)  # IMAP LOGIN carries ASCII only: imaplib would raise
        else:
            try:
                hook.get_conn()
            except (OSError, imaplib.IMAP4.error) as exc:
                if hook.mail_client is not None:  # connected, then the login was refused
                    hook.mail_client.shutdown()
                    raise MailboxUnavailable(f"{settings.where}: the server refused the login: "
                                             f"{_one_line(exc)}") from exc
                raise MailboxUnavailable(f"{settings.where}: cannot connect: {_one_line(exc)}") from exc
            client = hook.mail_client
        try:
            client.sock.settimeout(TIMEOUT)
            if client.state != "AUTH":
                raise MailboxUnavailable(f"{settings.where}: the connection has no login and password")
            mailbox = cls(client, settings, size_limit)
            yield mailbox
        finally:
            try:
                client.logout()  # LOGOUT, never CLOSE: see the module's docstring
            except (OSError, imaplib.IMAP4.error):
                client.shutdown()

    @property
    def key(self) -> str:
        """The folder as the ledger remembers what was read in it: connection, login, server and folder."""
        return f"{self.settings.where} {self.settings.folder}"

    def messages(self, skip: frozenset[int] | set[int] = frozenset()) -> Iterator[MailboxMessage]:
        """The folder's messages in UID order, each read up to its first ``READ_BYTES`` (what a report's reader
        needs); a message above the size limit is left where it is, unread, with a log line (and its UID in
        :attr:`too_large`). The UIDs in ``skip`` are not fetched. Nothing is marked read."""
        sizes = self._sizes()
        self.uids = set(sizes)
        log.info("%s: %d message(s) in %s", self.settings.where, len(sizes), self.settings.folder)
        for uid, size in sorted(sizes.items()):
            if uid in skip:  # read before and left for good: not fetched again
                continue
            if size > self.size_limit:
                log.warning("%s: message UID %d in %s is %d bytes, above the limit of %d: left there, unread",
                            self.settings.where, uid, self.settings.folder, size, self.size_limit)
                self.too_large.append(uid)
                continue
            raw = self._body(uid, partial=size > READ_BYTES)
            if raw is not None:  # None: another client removed it meanwhile
                yield MailboxMessage(uid, size, raw)

    def processed(self, uid: int) -> None:
        """Move one message to the processed folder (see :meth:`move`)."""
        self.move(uid, self.settings.processed_folder)

    def quarantined(self, uid: int) -> None:
        """Move one message that could not be applied to the quarantine folder, so that it stops no later pass
        and a person can look at it (see :meth:`move`)."""
        self.move(uid, self.settings.quarantine_folder)

    def move(self, uid: int, folder: str) -> None:
        """Move one message to ``folder``: MOVE (RFC 6851) where offered, else COPY, the
        ``\\Deleted`` flag and UID EXPUNGE (RFC 4315, UIDPLUS) of that UID alone. A server with neither
        cannot remove one message without risking others: the message stays, and this raises."""
        self._ensure_folder(folder)
        target = _quoted(folder)
        what = f"move message UID {uid} to {folder}"
        if "MOVE" in self.capabilities:
            self._call(what, what, self.client.uid, "MOVE", str(uid), target)
        elif "UIDPLUS" in self.capabilities:
            self._call(what, what, self.client.uid, "COPY", str(uid), target)
            self._call(what, what, self.client.uid, "STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
            self._call(what, what, self.client.uid, "EXPUNGE", str(uid))
        else:
            raise MailboxUnavailable(f"{self.settings.where}: the server offers neither MOVE nor UIDPLUS, so one "
                                     f"message cannot be moved alone; UID {uid} stays in {self.settings.folder}")
        log.info("%s: message UID %d moved to %s", self.settings.where, uid, folder)

    def _capabilities(self) -> set[str]:
        """The capabilities after the login (a server announces MOVE and UIDPLUS only then)."""
        data = self._call("ask the capabilities", "CAPABILITY refused", self.client.capability)
        return {word.upper() for word in data[-1].decode().split()}

    def _sizes(self) -> dict[int, int]:
        if not self.count:  # some servers refuse the range 1:* of an empty folder
            return {}
        data = self._call("read the sizes", f"cannot read {self.settings.folder}",
                          self.client.uid, "FETCH", "1:*", "(RFC822.SIZE)")
        sizes = {}
        for line in data:
            line = line[0] if isinstance(line, tuple) else line
            uid, size = re.search(rb"UID (\d+)", line or b""), re.search(rb"RFC822\.SIZE (\d+)", line or b"")
            if uid and size:
                sizes[int(uid.group(1))] = int(size.group(1))
        return sizes

    def _body(self, uid: int, *, partial: bool = False) -> bytes | None:
        """The message's bytes, or its first ``READ_BYTES`` (a partial FETCH, RFC 3501 ``BODY[]<0.n>``)."""
        section = f"BODY.PEEK[]<0.{READ_BYTES}>" if partial else "BODY.PEEK[]"
        data = self._call(f"read message UID {uid}", f"cannot read message UID {uid}",
                          self.client.uid, "FETCH", str(uid), f"({section})")
        for item in data:
            if isinstance(item, tuple) and b"BODY[]" in item[0] and re.search(rb"UID %d\b" % uid, item[0]):
                return item[1][:READ_BYTES] if partial else item[1]
        return None

    def _ensure_folder(self, name: str) -> None:
        """Create a folder the first time a message goes there, if it is missing, and subscribe to it so that
        mail programs show it. A mailbox with nothing to move is left as it was."""
        if name in self._folders_ready:
            return
        listed = self._call("list the folders", f"cannot list {name}", self.client.list, '""', _quoted(name))
        if not any(listed):
            self._call(f"create {name}", f"cannot create {name}", self.client.create, _quoted(name))
            self._call(f"subscribe to {name}", f"cannot subscribe to {name}", self.client.subscribe, _quoted(name))
            log.info("%s: created the folder %s", self.settings.where, name)
        self._folders_ready.add(name)

    def _call(self, doing: str, refused: str, command, *args) -> list:
        """Run one imaplib command; its data when the server answered OK, else MailboxUnavailable saying what
        failed, with the server's own words."""
        try:
            typ, data = command(*args)
        except (OSError, imaplib.IMAP4.error) as exc:
            raise MailboxUnavailable(f"{self.settings.where}: lost while trying to {doing}: {_one_line(exc)}") from exc
        if typ != "OK":
            answer = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
            raise MailboxUnavailable(f"{self.settings.where}: {refused}: {_one_line(answer)}")
        return data


def _oauth_session(conn, settings: MailboxSettings) -> imaplib.IMAP4:
    """A session logged in with the connection's OAuth 2.0 token (``auth_type: oauth2``, the same settings as
    an SMTP connection's; ``oauth.py``): IMAP ``AUTHENTICATE XOAUTH2``, or OAUTHBEARER where the server offers
    only that. The IMAP provider's hook logs in with a password only, so this session is built here with the
    hook's meaning of ``use_ssl`` (default true, port 993) and ``ssl_context`` (``default`` or ``none``)."""
    from include.invoice_mailing.oauth import OAuthConfigError, TokenRefused, TokenUnavailable, token_source
    from include.invoice_mailing.smtp_login import mask_token, sasl_response

    try:
        tokens = token_source(conn.conn_id, login=conn.login, password=conn.password, extra=conn.extra_dejson)
        token = tokens.token()
    except (OAuthConfigError, TokenRefused, TokenUnavailable) as exc:
        raise MailboxUnavailable(f"{settings.where}: {exc}") from None
    mask_token(token.value)
    client = _connect(conn, settings)
    offered = {capability.upper() for capability in client.capabilities}
    mechanism = "OAUTHBEARER" if "AUTH=XOAUTH2" not in offered and "AUTH=OAUTHBEARER" in offered else "XOAUTH2"
    initial = sasl_response(mechanism, tokens.settings.user, token.value, settings.host, settings.port).encode()
    errors: list[str] = []

    def respond(challenge: bytes) -> bytes:  # a challenge is the server's error (JSON): answer empty, then NO
        if challenge:
            errors.append(_one_line(challenge))
            return b""
        return initial

    try:
        client.authenticate(mechanism, respond)
    except (OSError, imaplib.IMAP4.error) as exc:
        client.shutdown()
        said = f" (the server's error: {errors[0]})" if errors else ""
        raise MailboxUnavailable(f"{settings.where}: the server refused the {mechanism} login of "
                                 f"{tokens.settings.user}: {_one_line(exc)}{said}") from exc
    return client


def _plain_session(conn, settings: MailboxSettings) -> imaplib.IMAP4:
    """A login or password outside ASCII (``blåbær``), which IMAP LOGIN cannot carry: ``AUTHENTICATE PLAIN``
    sends them as UTF-8 (RFC 4616). No character of the password is ever in an error."""
    client = _connect(conn, settings)
    if "AUTH=PLAIN" not in {capability.upper() for capability in client.capabilities}:
        client.shutdown()
        raise MailboxUnavailable(f"{settings.where}: the password has characters outside ASCII and the server "
                                 "offers no AUTHENTICATE PLAIN to carry them: use an ASCII password")
    response = b"\0" + (conn.login or "").encode() + b"\0" + (conn.password or "").encode()
    try:
        client.authenticate("PLAIN", lambda _: response)
    except (OSError, imaplib.IMAP4.error) as exc:
        client.shutdown()
        raise MailboxUnavailable(f"{settings.where}: the server refused the login: {_one_line(exc)}") from exc
    return client


def _connect(conn, settings: MailboxSettings) -> imaplib.IMAP4:
    """An IMAP session not yet logged in, with the hook's meaning of ``use_ssl`` and ``ssl_context``."""
    extra = conn.extra_dejson
    try:
        if extra.get("use_ssl", True):
            if (extra.get("ssl_context") or "default") not in ("default", "none"):
                raise MailboxUnavailable(f"{settings.where}: ssl_context {extra['ssl_context']!r}: 'default' or 'none'")
            context = ssl.create_default_context() if (extra.get("ssl_context") or "default") == "default" else None
            client = imaplib.IMAP4_SSL(settings.host, settings.port, ssl_context=context, timeout=TIMEOUT)
        else:
            client = imaplib.IMAP4(settings.host, settings.port, timeout=TIMEOUT)
    except OSError as exc:
        raise MailboxUnavailable(f"{settings.where}: cannot connect: {_one_line(exc)}") from exc
    return client


def _quoted(name: str) -> str:
    """A folder name as an IMAP quoted string (imaplib sends names as they are: a space would break)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _one_line(error: object) -> str:
    text = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
    text = re.sub(r"^b'(.*)'$", r"\1", text.strip())  # imaplib's errors show the server's bytes as b'...'
    return " ".join(text.split())
