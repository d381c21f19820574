"""Shared fixtures: an Airflow home of the test session, a real SMTP server, tiny ERPs, PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="invoice-mailing-airflow-"))
# Airflow reads its configuration when first imported: set it before any test module imports it.
os.environ.update({
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
})
sys.path.insert(0, str(ROOT))
# The access checks both auth managers' tests share: pytest explains their failed asserts as a test's.
pytest.register_assert_rewrite("tests.audit_access")

from sqlalchemy import create_engine, text  # noqa: E402

from dev.smtp_sink import SmtpSink  # noqa: E402
from tests.erp import TinyErp  # noqa: E402

# The files that take minutes (a real Airflow, whole nights with crashes), longest first, as measured on a
# clean CI run (seconds on a 2-core machine, from the JUnit report). `make test` hands files to its two
# test processes in collection order (--no-loadscope-reorder): these start first, so that the processes
# finish together instead of one running test_crash.py alone at the end (xdist's default puts the files
# with the most tests first, which put these last).
LONGEST_FIRST = (
    "tests/test_crash.py",  # 340 s
    "tests/test_operators_e2e.py",  # 280 s
    "tests/e2e/test_airflow_tool.py",  # 131 s
    "tests/test_bounce_collect.py",  # 83 s
    "tests/e2e/test_oauth_night.py",  # 80 s
    "tests/e2e/test_red_night.py",  # 50 s
    "tests/e2e/test_audit_ui.py",  # 65 s
    "tests/test_alerts.py",  # 52 s
    "tests/test_dag_run.py",  # 51 s
    "tests/e2e/test_audit_fab.py",  # 51 s
    "tests/test_documents.py",  # 45 s
)


def pytest_collection_modifyitems(config, items):
    rank = {path: n for n, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest as found

IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database, migrated once per session (dag.test() needs one)."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env=os.environ.copy())
    return _HOME


@pytest.fixture
def sink():
    with SmtpSink() as server:
        yield server


@pytest.fixture
def erp_path(tmp_path) -> Path:
    return tmp_path / "erp.db"


@pytest.fixture
def erp(erp_path) -> TinyErp:
    return TinyErp(create_engine(f"sqlite:///{erp_path}"))


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger_db(ledger_path):
    return create_engine(f"sqlite:///{ledger_path}")


def smtp_connection(port: int, **extra) -> str:
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                       "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 5, **extra}})


OPS = "ops@fjordlys.example"  # the operators' alert address of the tests


@pytest.fixture
def alerting(monkeypatch, sink):
    """The operators' connection on the test's SMTP server; no retries, so a failure is final at once.
    Returns a function: the alerts received so far."""
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_ALERTS", smtp_connection(sink.port, to=OPS,
                                                                      from_email="airflow@fjordlys.example"))
    monkeypatch.setenv("INVOICE_MAILING_RETRIES", "0")
    monkeypatch.setenv("INVOICE_MAILING_RETRY_DELAY_SECONDS", "0.1")

    def alerts():
        return [m.message for m in sink.received if m.envelope_to == [OPS]]

    return alerts


def sqlite_connection(path: Path) -> str:
    return json.dumps({"conn_type": "sqlite", "host": str(path)})


@pytest.fixture
def connections(monkeypatch, sink, erp_path, ledger_path):
    """The three Airflow connections of the DAG, as environment variables, pointing at this test's parts."""
    from include.invoice_mailing import tasks

    monkeypatch.setenv("AIRFLOW_CONN_ERP_DB", sqlite_connection(erp_path))
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", sqlite_connection(ledger_path))
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(sink.port))
    tasks.engine_for.cache_clear()
    yield
    tasks.engine_for.cache_clear()


def _server_missing(what: str, error: Exception):
    message = f"{what} is not reachable ({error}); start it to run this test"
    if IN_CI:
        pytest.fail(f"{message}. Under CI=true a missing server is a failure.")
    pytest.skip(message)


def postgres_pair(admin) -> dict:
    """Two fresh PostgreSQL databases (ERP, ledger): names, engines, Airflow connections and a cleanup."""
    names = [f"im_test_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("erp", "ledger")]
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    engines = [create_engine(f"{base}/{name}") for name in names]

    def cleanup():
        for engine in engines:
            engine.dispose()
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    connections = [json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres",
                               "schema": name}) for name in names]
    return {"names": names, "engines": engines, "connections": connections, "cleanup": cleanup}


def package_missing(message: str):
    if IN_CI:
        pytest.fail(f"{message}. Under CI=true a missing package is a failure.")
    pytest.skip(message)


@pytest.fixture
def faked_clock():
    """A stack on a faked clock (AirflowStack(fake_time=...), libfaketime): skips without it, fails under CI=true."""
    from dev.airflow_stack import FAKETIME_LIBRARY

    if not FAKETIME_LIBRARY.exists():
        package_missing(f"libfaketime ({FAKETIME_LIBRARY}) is not installed: dev/system-packages install")


def start_dovecot(capabilities: str | None = None, **options):
    """A Dovecot of dev/dovecot.py, started; skips when Dovecot is not installed (fails under CI=true)."""
    from dev.dovecot import Dovecot, DovecotMissing

    try:
        return Dovecot(capabilities, **options).start()
    except DovecotMissing as exc:
        package_missing(f"{exc}; the IMAP tests need it")


@pytest.fixture(scope="module")
def identity():
    """A real OAuth 2.0 authorization server on 127.0.0.1 over HTTPS (dev/token_server.py: Entra ID's and
    Google's token endpoints, and a plain one), one per module; msal, google-auth and Authlib trust its CA
    through REQUESTS_CA_BUNDLE while the module runs."""
    from dev.token_server import TokenServer

    server = TokenServer().start()
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(server.ca.bundle)
    yield server
    if previous is None:
        os.environ.pop("REQUESTS_CA_BUNDLE", None)
    else:
        os.environ["REQUESTS_CA_BUNDLE"] = previous
    server.stop()


@pytest.fixture(scope="module")
def internet():
    """The customers' mail servers behind the mail platform: an SMTP sink that Dovecot's submission relays to."""
    with SmtpSink() as server:
        yield server


def token_checking_dovecot(identity, relay_port: int, audience: str, mechanisms: str = "xoauth2 oauthbearer"):
    from dev.dovecot import TokenCheck

    return start_dovecot(tokens=TokenCheck(identity.public_key_pem(), (identity.issuer,), audience, mechanisms),
                         relay_port=relay_port)


@pytest.fixture(scope="module")
def exchange(identity, internet):
    """Dovecot standing for Exchange Online: IMAP and SMTP submission that take a bearer token only after
    checking it themselves (signature, expiry, issuer, audience https://outlook.office365.com, and that
    its subject is the login); submission relays to ``internet``."""
    from dev.token_server import MICROSOFT_RESOURCE

    server = token_checking_dovecot(identity, internet.port, MICROSOFT_RESOURCE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gmail(identity, internet):
    """Dovecot standing for Gmail: the same, for tokens with the audience https://mail.google.com/."""
    from dev.token_server import GOOGLE_SCOPE

    server = token_checking_dovecot(identity, internet.port, GOOGLE_SCOPE)
    yield server
    server.stop()


def oauth_connection(server, login: str, *, password: str | None = None, **extra) -> str:
    """An Airflow SMTP connection (as JSON) to a token-checking Dovecot's submission, with auth_type oauth2."""
    value = {"conn_type": "smtp", "host": "127.0.0.1", "port": server.submission_port, "login": login,
             "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 5, "auth_type": "oauth2", **extra}}
    if password is not None:
        value["password"] = password
    return json.dumps(value)


@pytest.fixture(scope="module")
def dovecot():
    """A real IMAP server (Dovecot) on 127.0.0.1, one per test module: each test takes its own login
    (``dovecot.new_login()``), so the tests share no messages."""
    server = start_dovecot()
    yield server
    server.stop()


def start_postfix(mail_folder: Path, relay_port: int):
    """A Postfix of dev/postfix.py, started; skips when Postfix is not installed (fails under CI=true)."""
    from dev.postfix import Postfix, PostfixMissing

    try:
        return Postfix(mail_folder, relay_port).start()
    except PostfixMissing as exc:
        package_missing(f"{exc}; the tests in which a real MTA writes the bounce need it")


@pytest.fixture(scope="module")
def remote_mx():
    """An SMTP sink behind the ``postfix`` relay, standing for the customers' mail servers (one per module)."""
    with SmtpSink() as server:
        yield server


@pytest.fixture(scope="module")
def postfix(dovecot, remote_mx):
    """A real Postfix relay on 127.0.0.1, one per module: mail for ``dev.postfix.REFUSING``'s domain fails
    (5.1.1) and Postfix sends its report to the envelope sender; mail for fjordlys.example lands in the
    module's Dovecot (``postfix.deliver_to(address, login)``); all other mail goes to ``remote_mx``."""
    server = start_postfix(dovecot.folder / "mail", remote_mx.port)
    yield server
    server.stop()


@pytest.fixture
def postgres_admin():
    """An autocommit engine on the local PostgreSQL server; skips (fails under CI) when there is none."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: no server here
        _server_missing("PostgreSQL at 127.0.0.1:5432", exc)
    yield admin
    admin.dispose()


@pytest.fixture
def postgres_databases(postgres_admin):
    """Two fresh PostgreSQL databases (ERP, ledger) on the local server, dropped afterwards."""
    pair = postgres_pair(postgres_admin)
    yield pair
    pair["cleanup"]()


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("invoice_mailing")


@pytest.fixture
def run_dag(airflow_db, connections):
    """Run the DAG in-process with dag.test(); returns the DagRun.

    Each call is a new run, as if triggered; ``rerun=<an earlier DagRun>`` clears that run's tasks and runs
    them again under the same run id, as an operator does with "Clear" in the UI.
    """
    import pendulum

    def run(date: str = "2026-11-24", conf: dict | None = None, rerun=None):
        if rerun is not None:
            return load_dag().test(logical_date=rerun.logical_date, run_after=rerun.run_after)
        logical_date = pendulum.parse(date).replace(tzinfo=pendulum.timezone("UTC"))
        return load_dag().test(logical_date=logical_date, run_conf=conf)

    return run


def night_events(run_id: str) -> list[dict]:
    """The extras of the events of the asset invoice_mailing://ledger/nights that a run published, in order."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from include.invoice_mailing.dag_settings import NIGHTS

    with create_session() as session:
        return [e.extra for e in session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == NIGHTS.uri, AssetEvent.source_run_id == run_id).order_by(AssetEvent.id))]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """ERP and ledger engines on SQLite files, then on the PostgreSQL server: the same tests on both."""
    if request.param == "sqlite":
        engines = [create_engine(f"sqlite:///{tmp_path / name}") for name in ("erp.db", "ledger.db")]
        yield {"name": "sqlite", "engines": engines,
               "connections": [sqlite_connection(tmp_path / n) for n in ("erp.db", "ledger.db")]}
        for engine in engines:
            engine.dispose()
    else:
        databases = request.getfixturevalue("postgres_databases")
        yield {"name": "postgresql", "engines": databases["engines"], "connections": databases["connections"]}
