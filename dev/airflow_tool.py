"""`make airflow`, `make airflow-stop` and `make audit-ui`: a real Airflow with the demo ERP that keeps running.

``python -m dev.airflow_tool start`` starts the topology of ``AirflowStack`` (api-server, scheduler,
dag-processor, triggerer; LocalExecutor, so no Redis) detached, with an SMTP sink as a process of its
own, returns once the api-server reports every component healthy, and prints where everything is.
What a developer builds up is kept between starts: the metadata database on the local PostgreSQL
(``invoice_mailing_airflow_`` and a hash of this clone's folder, so two clones never share one; created
when missing, never dropped), the secrets (so the login, the UI's sessions and connections saved in the
UI stay valid), the demo ERP, its ledger and the mail. ``stop`` ends exactly the processes that ``start``
recorded in ``running.json``; ``status`` says whether they run. ``audit-ui`` runs the api-server alone
on what ``make demo`` left (``demo/airflow/airflow.db``, ``demo/ledger.db``), on port 8081, with the
same login.

Everything lives in ``demo/airflow/`` (git-ignored), beside ``make demo``'s SQLite ``airflow.db``:

    secrets.json    the admin's password and the components' shared keys (mode 0600)
    passwords.json  the admin's password as Airflow's simple auth manager reads it
    running.json    the processes of the running instance (removed by stop)
    logs/           each component's log (api-server.log, ...), smtp-sink.log, and the task logs
    erp.db, ledger.db, outbox/   the demo ERP, the delivery ledger, each mail that arrived as .eml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from dev.airflow_stack import (
    ADMIN,
    POSTGRES_ADMIN_URL,
    ROOT,
    AirflowStack,
    StackError,
    StackSecrets,
    write_passwords,
)

HOME = ROOT / "demo" / "airflow"
AUDIT_PORT = 8081  # beside `make airflow`'s 8080: both can run at once


def database_for(root: Path) -> str:
    """The metadata database of the clone in ``root``: named after its folder (a short hash of the path), so that
    two clones on one machine never see each other's runs. At most 63 characters, PostgreSQL's limit."""
    return f"invoice_mailing_airflow_{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]}"


DATABASE = database_for(ROOT)
GRACE_SECONDS = 30  # between SIGTERM and SIGKILL: a task in flight gets to finish its SMTP session
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


class Refusal(Exception):
    """What keeps the tool from doing what was asked, in one line for the developer (no traceback)."""


def shown(path: Path) -> str:
    """A path as the developer typed the command: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- what must be there before anything starts --------------------------------------------------

def check_postgres(url: str) -> None:
    address = make_url(url)
    host, port = address.host or "127.0.0.1", address.port or 5432
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        raise Refusal(f"PostgreSQL is not answering at {host}:{port}: start it with `{START_POSTGRES}`") from None
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except SQLAlchemyError as error:
        detail = str(getattr(error, "orig", error)).strip().splitlines()[0]
        raise Refusal(f"PostgreSQL at {host}:{port} refused the connection: {detail}") from None
    finally:
        engine.dispose()


def check_port_free(port: int, what: str, setting: str, command: str = "make airflow") -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-stopped instance's TIME_WAIT is fine
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise Refusal(f"port {port} ({what}) is in use by another program: stop it, or choose another "
                          f"port with {setting}=<port> {command}") from None


# --- the processes of a running instance --------------------------------------------------------

def record(path: Path, url: str, processes: dict[str, int]) -> None:
    entries = {name: {"pid": pid, "created": psutil.Process(pid).create_time()} for name, pid in processes.items()}
    path.write_text(json.dumps({"url": url, "processes": entries}, indent=2))


def still_ours(entry: dict) -> psutil.Process | None:
    """The recorded process if it still runs; None once it ended, or when its pid now names another one."""
    try:
        process = psutil.Process(entry["pid"])
        return process if process.create_time() == entry["created"] and process.is_running() else None
    except psutil.NoSuchProcess:
        return None


def end(leaders: list[psutil.Process]) -> None:
    """SIGTERM each leader's process group and every descendant (a task process may have a session of its own),
    then SIGKILL whatever is left after GRACE_SECONDS."""
    members = []
    for leader in leaders:
        try:
            members += [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    signal_groups(leaders, signal.SIGTERM)
    for member in members:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(members, timeout=GRACE_SECONDS)
    for member in left:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    signal_groups(leaders, signal.SIGKILL)


def signal_groups(leaders: list[psutil.Process], signal_number: int) -> None:
    for leader in leaders:
        try:
            os.killpg(leader.pid, signal_number)
        except ProcessLookupError:
            pass


def running(home: Path) -> tuple[dict, dict[str, psutil.Process]]:
    """The record of the instance in ``home`` (empty when none) and its processes that still run."""
    path = home / "running.json"
    if not path.exists():
        return {}, {}
    recorded = json.loads(path.read_text())
    alive = {name: process for name, entry in recorded["processes"].items() if (process := still_ours(entry))}
    return recorded, alive


# --- the commands ---------------------------------------------------------------------------------

def start(home: Path, port: int, smtp_port: int, database: str, postgres_url: str) -> None:
    from include.invoice_mailing import demo

    recorded, alive = running(home)
    if recorded and len(alive) == len(recorded["processes"]):
        print(f"Airflow is already running at {recorded['url']} (login {ADMIN}, password in "
              f"{shown(home / 'secrets.json')}); `make airflow-stop` ends it.")
        return
    if alive:
        gone = sorted(set(recorded["processes"]) - set(alive))
        raise Refusal(f"Airflow at {recorded['url']} is only partly running ({', '.join(gone)} ended; see "
                      f"{shown(home / 'logs')}): run `make airflow-stop`, then `make airflow`.")
    check_postgres(postgres_url)
    check_port_free(port, "the api-server", "AIRFLOW_PORT")
    check_port_free(smtp_port, "the SMTP sink", "SMTP_SINK_PORT")

    logs, outbox = home / "logs", home / "outbox"
    logs.mkdir(parents=True, exist_ok=True)
    kept = StackSecrets.kept_in(home / "secrets.json")
    erp_path, ledger_path = home / "erp.db", home / "ledger.db"
    if not erp_path.exists():
        demo.main(["seed", "--erp", str(erp_path)])

    sink = start_sink(smtp_port, outbox, logs / "smtp-sink.log")
    helpers = {"smtp-sink": sink.pid}
    stack = None
    own = ": this clone's own, named after its folder" if database == DATABASE else ""
    print(f"Starting Airflow (metadata database {database}{own}; logs in {shown(logs)})...", flush=True)
    try:
        wait_for_sink(sink, smtp_port)
        env = demo_connections(erp_path, ledger_path, smtp_port)
        bounces = start_bounce_parts(home, smtp_port)
        if isinstance(bounces, dict):
            helpers.update(bounces["processes"])
            env.update(bounces["env"])
        stack = AirflowStack(home=home, port=port, database=database, stack_secrets=kept, logs=logs,
                             postgres_admin_url=postgres_url, extra_env=env)
        stack.start()
    except BaseException as error:  # Ctrl-C too: nothing may run unrecorded, where stop could not find it
        if stack is not None:
            stack.stop()  # a named database and a given home are kept
        end([process for pid in helpers.values() if (process := alive_pid(pid))])
        if not isinstance(error, StackError | Refusal | SQLAlchemyError):
            raise
        raise Refusal(f"Airflow did not come up: {str(error).splitlines()[0]} (the logs: {shown(logs)})") from None
    record(home / "running.json", stack.url, {**helpers, **{name: process.pid for name, process in stack.processes.items()}})
    print(f"Airflow is up at {stack.url}  (login {ADMIN} / {kept.password}; kept in {shown(home / 'secrets.json')})\n"
          f"  mail:   an SMTP sink on 127.0.0.1:{smtp_port}; each message lands in {shown(outbox)} as .eml\n"
          f"  logs:   {shown(logs)}: api-server.log, scheduler.log, dag-processor.log, triggerer.log, "
          f"smtp-sink.log, and the task logs (dag_id=...)\n"
          f"  kept:   metadata database {database} on PostgreSQL, ERP {shown(erp_path)}, ledger {shown(ledger_path)}\n"
          f"  demo night: in the UI open invoice_mailing, Trigger (and unpause it on trigger), logical date "
          f"{demo.AS_OF} 01:00 UTC (the demo ERP's invoices are due that night)\n"
          f"{bounce_lines(bounces)}"
          f"`make airflow-stop` ends it; `make airflow` again brings it back with the same login and history.")


def start_sink(port: int, outbox: Path, log_path: Path) -> subprocess.Popen:
    """dev/smtp_sink.py as a process of its own, so that mail keeps landing after the command returned."""
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "dev.smtp_sink", "--port", str(port), "--dir", str(outbox)],
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def demo_connections(erp_path: Path, ledger_path: Path, smtp_port: int) -> dict[str, str]:
    """The DAG's connections as environment variables: the demo ERP, its ledger, the sink for mail and alerts."""
    smtp = {"conn_type": "smtp", "host": "127.0.0.1", "port": smtp_port,
            "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 10}}
    alerts = {**smtp, "extra": {**smtp["extra"], "to": "operators@fjordlys.example",
                                "from_email": "invoice-mailing@fjordlys.example"}}
    return {
        "AIRFLOW_CONN_ERP_DB": json.dumps({"conn_type": "sqlite", "host": str(erp_path)}),
        "AIRFLOW_CONN_MAILING_LEDGER": json.dumps({"conn_type": "sqlite", "host": str(ledger_path)}),
        "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(smtp),
        "AIRFLOW_CONN_MAILING_ALERTS": json.dumps(alerts),
    }


# --- a bounce, end to end: Postfix in front of the sink, Dovecot as the bounce mailbox ----------------

BOUNCE_LOGIN = "bounces"
BOUNCE_ADDRESS = "bounces@bounces.fjordlys.example"  # a domain of its own: the company's other addresses go on
# The demo customer whose mail server no longer knows its addresses: Postfix takes the invoice, then fails it.
GONE_CUSTOMER, GONE_DOMAIN = "10003", "nordlys-bakeri.example"
GONE_ANSWER = "5.1.1 The email account that you tried to reach does not exist"


def start_bounce_parts(home: Path, sink_port: int) -> dict | str:
    """Postfix as the relay in front of the sink, failing ``GONE_DOMAIN``'s mail, and Dovecot as the bounce
    mailbox its reports land in; their folders (queue, mailbox) are kept in ``home``. The processes to record
    and the environment for Airflow; or, when they cannot run here, why (the stack then mails the sink directly)."""
    from dev.dovecot import Dovecot, DovecotMissing
    from dev.postfix import Postfix, PostfixMissing
    from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE

    if os.geteuid() != 0:
        return "Postfix and Dovecot are started as root only"
    try:
        mailbox = Dovecot(folder=home / "bounce-mailbox").start()
    except DovecotMissing as missing:
        return str(missing)
    try:
        relay = Postfix(home / "bounce-mailbox" / "mail", sink_port, refusing={GONE_DOMAIN: GONE_ANSWER},
                        local_domain=BOUNCE_ADDRESS.split("@")[1], folder=home / "relay").start()
    except BaseException as error:  # Dovecot runs already and nothing has recorded it: stop it here
        mailbox.stop()
        if isinstance(error, PostfixMissing):
            return str(error)
        raise
    relay.deliver_to(BOUNCE_ADDRESS, BOUNCE_LOGIN)
    smtp = {"conn_type": "smtp", "host": "127.0.0.1", "port": relay.port,
            "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 10}}
    return {"processes": {"dovecot": mailbox.master_pid(), "postfix": relay.master_pid()},
            "env": {"AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(smtp),
                    "AIRFLOW_CONN_MAILING_BOUNCES": json.dumps(mailbox.connection(BOUNCE_LOGIN, address=BOUNCE_ADDRESS)),
                    BOUNCE_KEY_VARIABLE: kept_key(home / "bounce-key")},
            "relay": relay.port, "imap": mailbox.port}


def kept_key(path: Path) -> str:
    """The VERP key of this instance: generated the first time, readable by its owner only, then kept."""
    import secrets

    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def bounce_lines(bounces: dict | str) -> str:
    if isinstance(bounces, str):
        return f"  bounces: not shown ({bounces}); invoices go to the sink directly\n"
    return (f"  bounces: invoices go through a Postfix on 127.0.0.1:{bounces['relay']}, which passes them to the sink "
            f"but fails customer {GONE_CUSTOMER}'s ({GONE_DOMAIN}: {GONE_ANSWER.split(' ', 1)[0]}) and sends its report "
            f"to the invoice's VERP address, into the bounce mailbox (Dovecot, 127.0.0.1:{bounces['imap']}, login "
            f"{BOUNCE_LOGIN}); invoice_mailing_bounces reads it at half past each hour (unpause it, or trigger it): "
            f"the delivery turns bounced on the auditors' pages\n")


def alive_pid(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def wait_for_sink(sink: subprocess.Popen, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if sink.poll() is not None:
            raise Refusal(f"the SMTP sink exited with {sink.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise Refusal(f"the SMTP sink did not listen on port {port} within {timeout:.0f} s") from None
            time.sleep(0.2)


def audit_ui(home: Path, port: int) -> int:
    """`make audit-ui`: the api-server alone, on what `make demo` left (its SQLite metadata and ledger), for the
    auditors' pages. The login is `make airflow`'s (``secrets.json``), printed here; it runs until Ctrl-C."""
    ledger_path = home.parent / "ledger.db"
    if not ledger_path.exists():
        raise Refusal(f"there is no demo ledger at {shown(ledger_path)}: run `make demo` first")
    check_port_free(port, "the auditors' pages", "AUDIT_PORT", "make audit-ui")
    kept = StackSecrets.kept_in(home / "secrets.json")
    passwords = write_passwords(home / "passwords.json", kept.password)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__BASE_URL": f"http://localhost:{port}/",
        "AIRFLOW__API__SECRET_KEY": kept.secret_key,
        "AIRFLOW__API_AUTH__JWT_SECRET": kept.jwt_secret,
        "AIRFLOW_CONN_MAILING_LEDGER": json.dumps({"conn_type": "sqlite", "host": str(ledger_path)}),
    })
    # make demo's metadata database, brought to this Airflow's schema (a no-op when it is; an upgrade needs it).
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    if migrate.returncode != 0:
        tail = (migrate.stderr or migrate.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Refusal(f"airflow db migrate of {shown(home / 'airflow.db')} failed: {tail[0]}")
    print(f"The auditors' pages of the demo's ledger ({shown(ledger_path)}) at "
          f"http://localhost:{port}/plugin/invoice-mailing\n"
          f"  login {ADMIN} / {kept.password} (the same as `make airflow`'s; kept in {shown(home / 'secrets.json')})\n"
          f"  Ctrl-C ends it; `make airflow` may run beside it, on its own port.", flush=True)
    try:
        return subprocess.run([sys.executable, "-m", "airflow", "api-server", "--port", str(port)], env=env,
                              cwd=ROOT).returncode
    except KeyboardInterrupt:
        return 0


def stop(home: Path) -> None:
    recorded, alive = running(home)
    if not recorded:
        print(f"Airflow is not running (nothing recorded in {shown(home / 'running.json')}).")
        return
    end(list(alive.values()))
    (home / "running.json").unlink()
    if alive:
        print(f"Stopped Airflow at {recorded['url']}: {', '.join(alive)}. Its history and login are kept; "
              "`make airflow` starts it again.")
    else:
        print(f"Airflow at {recorded['url']} had already ended; removed {shown(home / 'running.json')}.")


def status(home: Path) -> None:
    recorded, alive = running(home)
    if not recorded:
        print("Airflow is not running.")
    elif not alive:
        print(f"Airflow is not running (its processes at {recorded['url']} have ended).")
    elif len(alive) == len(recorded["processes"]):
        print(f"Airflow is running at {recorded['url']}: {', '.join(alive)}.")
    else:
        gone = sorted(set(recorded["processes"]) - set(alive))
        print(f"Airflow at {recorded['url']} is only partly running ({', '.join(gone)} ended).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.airflow_tool", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status", "audit-ui"))
    parser.add_argument("--home", type=Path, default=HOME, help="AIRFLOW_HOME, logs and kept files (demo/airflow)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"the api-server's port (AIRFLOW_PORT, else 8080; audit-ui: AUDIT_PORT, else {AUDIT_PORT})")
    parser.add_argument("--smtp-port", type=int, default=int(os.environ.get("SMTP_SINK_PORT", "8025")))
    parser.add_argument("--database", default=DATABASE, help="the metadata database, kept between starts")
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL,
                        help="a SQLAlchemy URL of the PostgreSQL server that may create the database")
    args = parser.parse_args(argv)
    home = args.home.resolve()
    try:
        if args.command == "audit-ui":
            return audit_ui(home, args.port or int(os.environ.get("AUDIT_PORT", AUDIT_PORT)))
        if args.command == "start":
            start(home, args.port or int(os.environ.get("AIRFLOW_PORT", "8080")), args.smtp_port, args.database,
                  args.postgres)
        elif args.command == "stop":
            stop(home)
        else:
            status(home)
    except Refusal as refusal:
        print(refusal, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
