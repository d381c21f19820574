"""A throw-away Postfix relay on 127.0.0.1, in a temporary folder: for the tests in which a real MTA
writes the bounce report.

Postfix is started by root (``postfix -c FOLDER/etc start``, as on this machine and CI) with its own
main.cf and master.cf, queue, data folder and log file (``postfix.log``, written by its postlog
service), no chroot and no DNS. It takes mail from 127.0.0.1 for any recipient (250), as the night's
relay does, and then:

- mail for a domain of ``refusing`` goes to Postfix's error(8) transport, which fails it (e.g. 5.1.1):
  Postfix's bounce(8) sends its delivery status notification to the envelope sender;
- mail for ``local_domain`` is delivered by virtual(8) into the Maildir of a Dovecot of dev/dovecot.py
  (``deliver_to``: an address to a login), as the mail user Dovecot reads it as; ``+extension``
  addresses go to the address without it (a VERP address to the bounce address);
- all other mail goes to ``relay_port`` on 127.0.0.1 (an SMTP sink standing for the customers' servers).

Written for Postfix 3.x (Debian 12's ``postfix``, 3.7). The system's own Postfix (``/etc/postfix``)
is not touched and need not be configured or running.
"""

from __future__ import annotations

import pwd
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

from dev.daemons import own_folder, run_forking, wait_until_answering
from dev.dovecot import MAIL_USER
from dev.smtp_sink import free_port

POSTFIX = "postfix"
HOSTNAME = "smtp.fjordlys.example"
REFUSING = {"nordvik-bygg.example": "5.1.1 Mailbox does not exist"}

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {folder}/spool
data_directory = {folder}/data
maillog_file = {folder}/postfix.log
maillog_file_prefixes = {folder}
myhostname = {hostname}
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# Accept every recipient, as a relay that cannot know the remote mailboxes does: without this, smtpd
# would refuse the error(8) transport's domains at RCPT TO itself and no report would be written.
smtpd_reject_unlisted_recipient = no
transport_maps = texthash:{folder}/etc/transport
relayhost = [127.0.0.1]:{relay_port}
smtp_dns_support_level = disabled
virtual_mailbox_domains = {local_domain}
virtual_mailbox_base = {mail_folder}
virtual_mailbox_maps = texthash:{folder}/etc/mailboxes
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = {uid}
recipient_delimiter = +
"""

# The services this relay uses, none chrooted (the fifth column); smtpd listens on the test's port.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0   cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - -   trivial-rewrite
bounce    unix  - - n - 0   bounce
defer     unix  - - n - 0   bounce
trace     unix  - - n - 0   bounce
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - -   proxymap
smtp      unix  - - n - -   smtp
relay     unix  - - n - -   smtp
error     unix  - - n - -   error
retry     unix  - - n - -   error
virtual   unix  - n n - -   virtual
anvil     unix  - - n - 1   anvil
scache    unix  - - n - 1   scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixMissing(RuntimeError):
    """Postfix is not installed here, or is not a version this module configures."""


def postfix_version() -> str:
    """Postfix's version, e.g. ``3.7.11``; PostfixMissing when it is not installed."""
    if shutil.which(POSTFIX) is None:
        raise PostfixMissing("postfix is not installed (Debian: postfix; dev/system-packages install)")
    output = subprocess.run(["postconf", "-dh", "mail_version"], check=True, capture_output=True, text=True)
    return output.stdout.strip()


class Postfix:
    """Start and stop the relay; say where ``local_domain``'s addresses are delivered; wait for mail there.

    ``mail_folder``: the Dovecot's folder of homes (``Dovecot.folder / "mail"``), each login's Maildir
    under it; ``relay_port``: where mail for other domains goes; ``refusing``: domain -> the status and
    text the error(8) transport fails its mail with.
    """

    def __init__(self, mail_folder: Path, relay_port: int, refusing: dict[str, str] | None = None,
                 local_domain: str = "fjordlys.example", folder: Path | None = None):
        self.kept = folder  # `make airflow`'s relay: its queue kept between starts; else a temporary folder
        self.mail_folder = Path(mail_folder)
        self.relay_port = relay_port
        self.refusing = REFUSING if refusing is None else refusing
        self.local_domain = local_domain
        self.mailboxes: dict[str, str] = {}
        self.port = 0
        self.folder: Path | None = None

    @property
    def config(self) -> Path:
        return self.folder / "etc"

    def start(self) -> Postfix:
        version = postfix_version()
        if not version.startswith("3."):
            raise PostfixMissing(f"postfix {version} is installed; dev/postfix.py writes Postfix 3's configuration")
        self.folder = own_folder(self.kept, "invoice-mailing-postfix-")  # not writable by others: Postfix checks
        for name in ("etc", "spool", "data"):
            (self.folder / name).mkdir(exist_ok=True)
        shutil.chown(self.folder / "data", "postfix")
        mail = pwd.getpwnam(MAIL_USER)
        self.port = free_port()
        (self.config / "main.cf").write_text(MAIN_CF.format(
            folder=self.folder, hostname=HOSTNAME, relay_port=self.relay_port, local_domain=self.local_domain,
            mail_folder=self.mail_folder, uid=mail.pw_uid, gid=mail.pw_gid))
        (self.config / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.config / "transport").write_text("".join(f"{domain} error:{answer}\n"
                                                       for domain, answer in self.refusing.items()))
        self._write_mailboxes()
        self._postfix("start")
        wait_until_answering(lambda: smtplib.SMTP("127.0.0.1", self.port, timeout=2).quit(),
                             (OSError, smtplib.SMTPException), f"postfix on port {self.port}", self.log)
        return self

    def _postfix(self, command: str) -> None:
        run_forking([POSTFIX, "-c", str(self.config), command], self.folder / f"{command}.err",
                    lambda errors: f"postfix {command} failed: {errors}\n{self.log()[-2000:]}")

    def _write_mailboxes(self) -> None:
        (self.config / "mailboxes").write_text("".join(f"{address} {login}/Maildir/\n"
                                                       for address, login in self.mailboxes.items()))

    def master_pid(self) -> int:
        """The pid of Postfix's master process (it forked into the background)."""
        return int((self.folder / "spool" / "pid" / "master.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop the master and its processes (``postfix stop`` waits until the master is gone)."""
        if self.folder is None:
            return
        subprocess.run([POSTFIX, "-c", str(self.config), "stop"], capture_output=True)
        if not self.kept:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def deliver_to(self, address: str, login: str) -> None:
        """Deliver mail for ``address`` (and its ``+extension`` addresses) into ``login``'s Maildir.

        ``postfix reload``: a texthash table is read when a process starts, and the reload ends the old ones.
        """
        self.mailboxes[address.lower()] = login
        self._write_mailboxes()
        self._postfix("reload")

    def maildir(self, login: str) -> Path:
        return self.mail_folder / login / "Maildir"

    def wait_for_mail(self, login: str, count: int = 1, timeout: float = 15.0) -> list[bytes]:
        """The messages virtual(8) delivered into ``login``'s Maildir, once there are ``count``, oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            files = [path for sub in ("new", "cur") for path in (self.maildir(login) / sub).glob("*")]
            if len(files) >= count:
                return [path.read_bytes() for path in sorted(files, key=lambda p: p.name)]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(files)} of {count} messages in {self.maildir(login)} after "
                                   f"{timeout:.0f} s; Postfix's log:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        """Postfix's log (its postlog service writes it into the folder)."""
        path = self.folder / "postfix.log" if self.folder else None
        return path.read_text(errors="replace") if path and path.exists() else ""

