"""A throw-away Dovecot IMAP server on 127.0.0.1, in a temporary folder: for the bounce mailbox's tests.

Dovecot runs as root (as on this machine and CI) and drops to its own users: ``default_internal_user``
for its helpers, ``default_login_user`` for the login processes, and the ``mail`` user for the mail
files (Maildir, under the folder). Any login name is let in with the password ``secret`` (a static
passdb: a passwd file is read again only when its time stamp changes, a second later) and gets its own
mailbox, so that tests sharing one server share no messages (:meth:`Dovecot.new_login`).
With ``tokens`` it also takes OAuth 2.0 logins (XOAUTH2, OAUTHBEARER) and checks the bearer token itself,
as Exchange Online and Gmail do; with ``relay_port`` it also runs its SMTP submission service (Debian's
``dovecot-submissiond``), which authenticates the same way and relays to that port: a stand-in for
``smtp.office365.com``. Written for Dovecot 2.3 (Debian 12's ``dovecot-imapd``); 2.4 renamed most settings
and is refused.
"""

from __future__ import annotations

import argparse
import imaplib
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dev.daemons import own_folder, run_forking, wait_until_answering
from dev.smtp_sink import free_port

PASSWORD = "secret"
DOVECOT = "dovecot"
SUBMISSION_SERVICE = "/usr/lib/dovecot/submission"
MAIL_USER = "mail"

# Dovecot 2.3's configuration; {folder}, {port}... are filled in, Dovecot's own %u stays. Debian's mail
# user (uid 8) is below Dovecot's default first_valid_uid (500): the mail user's uid is the first valid.
CONFIG_23 = """\
base_dir = {folder}/run
state_dir = {folder}/state
log_path = {folder}/dovecot.log
protocols = imap{protocols}
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
default_internal_user = dovecot
default_login_user = dovenull
auth_mechanisms = plain login{mechanisms}
auth_failure_delay = 0
{oauth_passdb}passdb {{
  driver = static
  mechanisms = plain login
  args = password={password}
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_user} home={folder}/mail/%u
}}
mail_location = maildir:~/Maildir
first_valid_uid = {mail_uid}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{submission}# No penalty of seconds on the logins that follow a refused one (the listener's mode 0 turns it off).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{capability}
"""


# With ``tokens``: a passdb that checks OAuth 2.0 bearer tokens itself (XOAUTH2, OAUTHBEARER), by local
# validation: the JWT's signature with the issuer's public key (under keys/default/RS256/default: no azp,
# no kid), its expiry, its issuer and audience, and that its ``sub`` is the login.
OAUTH_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = {mechanisms}
  args = {folder}/oauth2.conf.ext
}}
"""
OAUTH2_CONF = """\
introspection_mode = local
local_validation_key_dict = fs:posix:prefix={folder}/keys/
issuers = {issuers}
username_attribute = sub
active_attribute = aud
active_value = {audience}
"""
# With ``relay_port``: Dovecot's SMTP submission service, which authenticates through the same passdbs and
# relays what it takes to 127.0.0.1:relay_port (an SMTP sink standing for the rest of the Internet).
SUBMISSION = """\
hostname = {hostname}
submission_relay_host = 127.0.0.1
submission_relay_port = {relay_port}
submission_relay_trusted = no
service submission-login {{
  inet_listener submission {{
    port = {submission_port}
  }}
}}
"""


@dataclass(frozen=True)
class TokenCheck:
    """What Dovecot trusts in a bearer token: the issuer's public key (PEM), the issuers, the audience."""

    public_key_pem: str
    issuers: tuple[str, ...]
    audience: str
    mechanisms: str = "xoauth2 oauthbearer"  # e.g. "oauthbearer" alone, to play a server without XOAUTH2


class DovecotMissing(RuntimeError):
    """Dovecot is not installed here, or is not a version this module configures."""


def dovecot_version() -> str:
    """``dovecot --version``'s number, e.g. ``2.3.19.1``; DovecotMissing when it is not installed."""
    if shutil.which(DOVECOT) is None:
        raise DovecotMissing("dovecot is not installed (Debian: dovecot-imapd; dev/system-packages install)")
    output = subprocess.run([DOVECOT, "--version"], check=True, capture_output=True, text=True).stdout
    return output.split()[0]


class Dovecot:
    """Start and stop the server; append and list messages of a login's folders.

    ``capabilities``: replace the capabilities Dovecot announces after the login (its setting
    ``imap_capability``), e.g. without MOVE, to play an older server.
    """

    def __init__(self, capabilities: str | None = None, folder: Path | None = None, *,
                 tokens: TokenCheck | None = None, relay_port: int | None = None, password: str = PASSWORD):
        self.capabilities = capabilities
        self.password = password      # every login's (a static passdb); any UTF-8 text
        self.tokens = tokens          # OAuth 2.0 logins, checked by Dovecot (passdb oauth2)
        self.relay_port = relay_port  # SMTP submission, relaying to this port
        self.port = 0
        self.submission_port = 0
        self.kept = folder  # `make airflow`'s mailbox: kept between starts; else a temporary folder
        self.folder: Path | None = None

    @property
    def config(self) -> Path:
        return self.folder / "dovecot.conf"

    def start(self) -> Dovecot:
        version = dovecot_version()
        if self.relay_port is not None and not Path(SUBMISSION_SERVICE).exists():
            raise DovecotMissing(f"Dovecot's SMTP submission is not installed ({SUBMISSION_SERVICE}; Debian: "
                                 "dovecot-submissiond; dev/system-packages install)")
        if not version.startswith("2.3."):
            raise DovecotMissing(f"dovecot {version} is installed; dev/dovecot.py writes Dovecot 2.3's configuration")
        self.folder = own_folder(self.kept, "invoice-mailing-dovecot-")
        mail = self.folder / "mail"
        mail.mkdir(exist_ok=True)
        shutil.chown(mail, MAIL_USER, MAIL_USER)
        self.port = free_port()
        capability = f"imap_capability = {self.capabilities}" if self.capabilities else ""
        oauth_passdb = ""
        if self.tokens is not None:
            keys = self.folder / "keys" / "default" / "RS256"
            keys.mkdir(parents=True, exist_ok=True)
            (keys / "default").write_text(self.tokens.public_key_pem)
            (self.folder / "oauth2.conf.ext").write_text(OAUTH2_CONF.format(
                folder=self.folder, issuers=" ".join(self.tokens.issuers), audience=self.tokens.audience))
            oauth_passdb = OAUTH_PASSDB.format(folder=self.folder, mechanisms=self.tokens.mechanisms)
        submission = ""
        if self.relay_port is not None:
            self.submission_port = free_port()
            submission = SUBMISSION.format(hostname="smtp.fjordlys.example", relay_port=self.relay_port,
                                           submission_port=self.submission_port)
        self.config.write_text(CONFIG_23.format(
            folder=self.folder, port=self.port, mail_user=MAIL_USER, mail_uid=pwd.getpwnam(MAIL_USER).pw_uid,
            password=self.password, capability=capability, oauth_passdb=oauth_passdb, submission=submission,
            protocols=" submission" if submission else "", mechanisms=f" {self.tokens.mechanisms}" if oauth_passdb else ""))
        run_forking([DOVECOT, "-c", str(self.config)], self.folder / "start.err",
                    lambda errors: f"dovecot did not start: {errors}")
        wait_until_answering(lambda: imaplib.IMAP4("127.0.0.1", self.port, timeout=2).shutdown(), (OSError,),
                             f"dovecot on port {self.port}", self._log)
        if self.submission_port:
            wait_until_answering(lambda: smtplib.SMTP("127.0.0.1", self.submission_port, timeout=2).quit(),
                                 (OSError, smtplib.SMTPException), f"dovecot's submission on port "
                                 f"{self.submission_port}", self._log)
        return self

    def _log(self) -> str:
        log = self.folder / "dovecot.log"
        return log.read_text() if log.exists() else "no log"

    def logins(self, service: str = "submission") -> list[tuple[str, str]]:
        """The successful logins of a service (``submission`` or ``imap``), as (user, SASL mechanism), in order."""
        found = re.findall(rf"{service}-login: Info: Login: user=<([^>]*)>, method=([A-Z0-9-]+)", self._log())
        return [(user, method) for user, method in found]

    def master_pid(self) -> int:
        """The pid of Dovecot's master process (it forked into the background)."""
        return int((self.folder / "run" / "master.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.folder is None:
            return
        subprocess.run(["doveadm", "-c", str(self.config), "stop"], capture_output=True)
        pid_file = self.folder / "run" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:  # the master removes it when it has ended
            time.sleep(0.05)
        if not self.kept:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def new_login(self, prefix: str = "bounces") -> str:
        """A new login with an empty mailbox of its own (Dovecot makes it at the first login)."""
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def connection(self, login: str, **extra) -> dict:
        """An Airflow IMAP connection to this server for ``login``, as a dict (``json.dumps`` it for
        an ``AIRFLOW_CONN_...`` variable)."""
        return {"conn_type": "imap", "host": "127.0.0.1", "port": self.port, "login": login,
                "password": self.password, "extra": {"use_ssl": False, **extra}}

    def _session(self, login: str) -> imaplib.IMAP4:
        session = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        session.authenticate("PLAIN", lambda _: f"\0{login}\0{self.password}".encode())
        return session

    def append(self, login: str, raw: bytes, folder: str = "INBOX", flags: str = "") -> None:
        """Put a message into a folder (IMAP APPEND), creating the folder when missing."""
        session = self._session(login)
        try:
            if folder != "INBOX":
                session.create(_quoted(folder))  # NO when it exists already: that is fine
            typ, data = session.append(_quoted(folder), f"({flags})" if flags else None, None, raw)
            if typ != "OK":
                raise RuntimeError(f"APPEND to {folder} refused: {data}")
        finally:
            session.logout()

    def messages(self, login: str, folder: str = "INBOX") -> list[tuple[bytes, set[str]]]:
        """A folder's messages in order, each as its exact bytes and its flags (e.g. ``{"\\\\Seen"}``),
        read without changing them; an empty list when the folder does not exist."""
        session = self._session(login)
        try:
            typ, _ = session.select(_quoted(folder), readonly=True)
            if typ != "OK":
                return []
            typ, data = session.uid("SEARCH", "ALL")
            uids = data[0].split()
            found = []
            for uid in uids:
                typ, data = session.uid("FETCH", uid, "(FLAGS BODY.PEEK[])")
                head, raw = next(item for item in data if isinstance(item, tuple))
                tail = b" ".join(item for item in data if isinstance(item, bytes))
                flags = re.search(rb"FLAGS \(([^)]*)\)", head + tail).group(1).decode().split()
                found.append((raw, set(flags) - {"\\Recent"}))  # \Recent: only says which session saw it first
            return found
        finally:
            session.logout()

    def folders(self, login: str) -> list[str]:
        """The names of the login's folders."""
        session = self._session(login)
        try:
            _, data = session.list()
            return [line.decode().rsplit(' "/" ', 1)[1].strip('"') for line in data if line]
        finally:
            session.logout()


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with Dovecot() as server:
        login = server.new_login()
        print(f"Dovecot {dovecot_version()} on 127.0.0.1:{server.port}, login {login}, password {PASSWORD}",
              flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()


if __name__ == "__main__":
    main()
