"""A real Airflow 3.3 on this machine, as processes: api-server, scheduler, dag-processor and triggerer.

``AirflowStack`` is a context manager for end-to-end tests, UI tests and benchmarks: a fresh
AIRFLOW_HOME and PostgreSQL metadata database, free ports, one shared environment (JWT secret,
secret key, execution API URL, executor, this repository's dags/ and plugins/), ``airflow db
migrate``, the components started with their output in ``<home>/<component>.log``, and everything
stopped (process groups) and dropped on exit. ``stack.client()`` is a small REST API client.

    with AirflowStack(extra_env={"AIRFLOW_CONN_ERP_DB": ...}) as stack:
        api = stack.client()
        run = api.trigger("invoice_mailing", logical_date="2026-11-24T01:00:00Z")
        api.wait_for_run("invoice_mailing", run["dag_run_id"], {"success", "failed"})

``make airflow`` (dev/airflow_tool.py) starts the same topology detached, for people: a kept metadata
database (``database=``), kept secrets (``stack_secrets=``) and its logs in a folder of their own (``logs=``).

With ``executor="CeleryExecutor"`` and ``workers=("worker-a", "worker-b")`` it is the topology of
docker-compose.yaml: Redis (``TEST_REDIS_URL``, database 5, a queue of the stack's own) as the broker,
PostgreSQL for the Celery results, and Celery workers. As root each worker runs on its own "host": its
own host name and process namespace (``unshare``), as a worker on another machine looks to Airflow and
to the ledger. ``kill_worker`` SIGKILLs one with everything it started.

With ``fake_time=`` every component lives at that instant, and its clock ticks on from there: Debian's
libfaketime (LD_PRELOAD, FAKETIME as a fixed offset, so all processes agree) fakes Python's clock, and the
stack's database answers ``now()`` with the same offset. Both are needed: the timetable picks the next run
with Python's clock, but the scheduler creates it once ``next_dagrun_create_after <= now()`` in PostgreSQL.
The test process keeps the real clock.

The simple auth manager by default (one user, ``admin``); ``auth_manager="fab"`` runs FAB's, as
docker-compose.yaml does: ``admin`` is made with the stack (Admin role), ``create_user`` makes others with
FAB's ``airflow users create``, and ``token(user, password)`` gets any user's JWT from ``POST /auth/token``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN = "admin"
# Debian's libfaketime (dev/system-packages); the thread-safe build, as the components run threads.
FAKETIME_LIBRARY = Path(f"/usr/lib/{os.uname().machine}-linux-gnu/faketime/libfaketimeMT.so.1")
# The auth managers a stack can run: Airflow's own, and FAB's (docker-compose.yaml's: users and roles in the database).
AUTH_MANAGERS = {
    "simple": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "fab": "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_be_another_host() -> bool:
    """True when a worker can get its own host name and process namespace here (root, unshare).

    AIRFLOW_STACK_ONE_HOST=1 keeps every worker on this host, as a user without root gets it."""
    if os.environ.get("AIRFLOW_STACK_ONE_HOST") == "1" or os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


@dataclass(frozen=True)
class StackSecrets:
    """The admin's password and the keys every component must share: fresh for a test, kept by make airflow
    so that a login, the UI's sessions and the connections saved in the UI survive a restart."""

    password: str
    secret_key: str
    jwt_secret: str
    fernet_key: str

    @classmethod
    def generate(cls) -> StackSecrets:
        from cryptography.fernet import Fernet

        return cls(password=secrets.token_urlsafe(12), secret_key=secrets.token_hex(16),
                   jwt_secret=secrets.token_hex(32), fernet_key=Fernet.generate_key().decode())

    @classmethod
    def kept_in(cls, path: Path) -> StackSecrets:
        """The secrets in ``path``, generated and written there (readable by its owner only) the first time."""
        if path.exists():
            return cls(**json.loads(path.read_text()))
        kept = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            json.dump(asdict(kept), file, indent=2)
        return kept


def write_passwords(path: Path, password: str) -> Path:
    """The admin's password as Airflow's simple auth manager reads it, readable by its owner only."""
    path.write_text(json.dumps({ADMIN: password}))
    path.chmod(0o600)
    return path


class StackError(RuntimeError):
    """The stack did not come up, or a wait ran out; the message ends with the components' log tails."""


class AirflowStack:
    def __init__(self, *, executor: str = "LocalExecutor", extra_env: dict[str, str] | None = None,
                 components: Iterable[str] = COMPONENTS, postgres_admin_url: str = POSTGRES_ADMIN_URL,
                 home: Path | None = None, port: int | None = None, parallelism: int = 4,
                 keep_home: bool = False, startup_timeout: float = 180, workers: Iterable[str] = (),
                 worker_concurrency: int = 2, broker_url: str = REDIS_URL, database: str | None = None,
                 stack_secrets: StackSecrets | None = None, logs: Path | None = None,
                 fake_time: datetime | None = None, auth_manager: str = "simple"):
        """``database``: a metadata database of this name, created when missing and kept on exit (else a
        fresh one, dropped on exit); ``stack_secrets``: kept ones (else fresh); ``logs``: the folder of the
        components' own logs (else the home); ``fake_time``: the instant the components' clocks start at;
        ``auth_manager``: ``simple`` or ``fab``."""
        if auth_manager not in AUTH_MANAGERS:
            raise ValueError(f"auth_manager must be one of {sorted(AUTH_MANAGERS)}, not {auth_manager!r}")
        self.executor = executor
        self.auth_manager = auth_manager
        self.fake_time = fake_time
        self.clock_offset_seconds = 0  # set by start() when fake_time is given
        self.workers = tuple(workers)
        self.worker_concurrency = worker_concurrency
        self.broker_url = broker_url
        self.queue = f"airflow_stack_{uuid.uuid4().hex[:10]}"  # the stack's own Celery queue in a shared Redis
        self.separate_hosts = bool(self.workers) and can_be_another_host()
        self.killed: set[str] = set()
        self._redis_keys_before: set[bytes] | None = None
        self.extra_env = dict(extra_env or {})
        self.components = tuple(components)
        self.postgres_admin_url = postgres_admin_url
        self.home = Path(home) if home else None
        self.port = port
        self.parallelism = parallelism
        self.keep_home = keep_home or home is not None
        self.startup_timeout = startup_timeout
        self.secrets = stack_secrets or StackSecrets.generate()
        self.password = self.secrets.password
        self.logs = Path(logs) if logs else None
        self.processes: dict[str, subprocess.Popen] = {}
        self.keep_database = database is not None
        self.database: str | None = database
        self._admin = None

    # --- set-up and tear-down -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AirflowStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.home = self.home or Path(tempfile.mkdtemp(prefix="airflow-stack-"))
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = self.logs or self.home
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        if self.fake_time is not None:
            if not FAKETIME_LIBRARY.exists():
                raise StackError(f"fake_time needs libfaketime ({FAKETIME_LIBRARY}): dev/system-packages install")
            self.clock_offset_seconds = round((self.fake_time - datetime.now(UTC)).total_seconds())
        self._create_database()
        if self.workers:
            self._redis_keys_before = set(self._redis().keys("*"))
        write_passwords(self.home / "passwords.json", self.password)
        self.env = self._environment()
        migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env,
                                 capture_output=True, text=True, timeout=300)
        if migrate.returncode != 0:
            raise StackError(f"airflow db migrate failed:\n{migrate.stdout[-2000:]}\n{migrate.stderr[-3000:]}")
        if self.auth_manager == "fab":  # what airflow-init does: FAB's users live in the database, admin first
            self.create_user(ADMIN, "Admin", password=self.password)
        for component in self.components:
            self._spawn(component)
        for name in self.workers:
            self.start_worker(name)
        self.wait_healthy()

    def _create_database(self) -> None:
        self._admin = create_engine(self.postgres_admin_url, isolation_level="AUTOCOMMIT")
        self.database = self.database or f"airflow_stack_{uuid.uuid4().hex[:10]}"
        with self._admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                  {"name": self.database}).first()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{self.database}"'))
        if self.clock_offset_seconds:
            self._fake_database_clock()

    def _fake_database_clock(self) -> None:
        """``now()`` in the stack's database runs ``clock_offset_seconds`` off, as the components' clocks do.

        pg_catalog is searched first unless the search path names it: placed last, ``public.now()`` wins
        for every connection to this database (SQLAlchemy's ``func.now()`` is an unqualified ``now()``)."""
        database_url = self._admin.url.set(database=self.database)
        engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f"CREATE OR REPLACE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql STABLE AS "
                                  f"$$ SELECT pg_catalog.now() + interval '{self.clock_offset_seconds} seconds' $$"))
                conn.execute(text(f'ALTER DATABASE "{self.database}" SET search_path TO "$user", public, pg_catalog'))
        finally:
            engine.dispose()

    def _environment(self) -> dict[str, str]:
        base = self.postgres_admin_url.rsplit("/", 1)[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update({
            # config/ holds airflow_local_settings.py: the scheduler warms the renderer for its task processes.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "config"), os.environ.get("PYTHONPATH")])),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__DEFAULT_TIMEZONE": "Europe/Oslo",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGERS[self.auth_manager],
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"{base}/{self.database}",
            "AIRFLOW__API__BASE_URL": f"{self.url}/",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": self.secrets.secret_key,
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secrets.jwt_secret,
            "AIRFLOW__CORE__FERNET_KEY": self.secrets.fernet_key,
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname",  # no DNS look-up for a worker's host name
            # Several stacks (and a developer's Airflow) may run on this machine: no fixed ports.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
        })
        if self.executor == "CeleryExecutor":
            env.update({
                "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{base.replace('+psycopg2', '')}/{self.database}",
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            })
        if self.clock_offset_seconds:
            # The monotonic clocks move by the same offset (libfaketime's default): with
            # FAKETIME_DONT_FAKE_MONOTONIC=1, libfaketime 0.9.10 makes Python's time.sleep fail with EINVAL.
            env.update({"LD_PRELOAD": str(FAKETIME_LIBRARY), "FAKETIME": f"{self.clock_offset_seconds:+d}"})
        env.update(self.extra_env)
        return env

    def _spawn(self, component: str) -> None:
        command = [sys.executable, "-m", "airflow", component]
        if component == "api-server":
            command += ["--port", str(self.port), "--host", "127.0.0.1"]
        log = (self.logs / f"{component}.log").open("ab")
        # No terminal: make airflow leaves them running after it returns.
        self.processes[component] = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)
        log.close()

    def create_user(self, username: str, role: str, *, password: str | None = None) -> str:
        """A FAB user with one of FAB's roles (Viewer, User, Op, Admin, Public, or one made with ``airflow roles
        create``), by the FAB provider's ``airflow users create`` as an operator runs it; returns the password.

        About 5 to 10 s each on this machine, most of it importing Airflow and building FAB's app. The simple
        auth manager's users are its configuration, fixed when the stack starts: there is nothing to create."""
        if self.auth_manager != "fab":
            raise StackError(f"only the FAB auth manager keeps users in the database, not {self.auth_manager}")
        password = password or secrets.token_urlsafe(12)
        create = subprocess.run(
            # --password=...: token_urlsafe may begin with "-", which argparse would take for an option
            [sys.executable, "-m", "airflow", "users", "create", "--username", username, f"--password={password}",
             "--role", role, "--email", f"{username}@airflow-stack.invalid", "--firstname", username,
             "--lastname", role],
            env=self.env, capture_output=True, text=True, timeout=300)
        if create.returncode != 0 or f'User "{username}" created' not in create.stdout:
            raise StackError(f"airflow users create {username} ({role}) failed:\n{create.stdout[-2000:]}\n"
                             f"{create.stderr[-3000:]}")
        return password

    def token(self, username: str = ADMIN, password: str | None = None) -> str:
        """A JWT for the user, from the auth manager's ``POST /auth/token`` (both managers answer it alike)."""
        answer = httpx.post(f"{self.url}/auth/token", json={"username": username, "password": password or self.password},
                            timeout=30)
        if answer.status_code != 201:
            raise StackError(f"POST /auth/token for {username}: {answer.status_code} {answer.text[:500]}")
        return answer.json()["access_token"]

    def start_worker(self, name: str) -> None:
        """A Celery worker named ``name``; as root on its own "host" (host name and process namespace)."""
        command = [sys.executable, "-m", "airflow", "celery", "worker", "--celery-hostname", f"{name}@{name}",
                   "--queues", self.queue, "--concurrency", str(self.worker_concurrency)]
        if self.separate_hosts:
            command = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--",
                       "/bin/sh", "-c", 'hostname "$0" && exec "$@"', name, *command]
        env = {**self.env, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
        log = (self.logs / f"worker {name}.log").open("ab")
        self.processes[f"worker {name}"] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                            start_new_session=True, cwd=self.home)
        log.close()

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker and everything it started, as if its host had lost power."""
        import psutil

        process = self.processes[f"worker {name}"]
        self.killed.add(f"worker {name}")
        try:  # the whole tree: Airflow's task supervisors start sessions of their own
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(timeout=30)

    def _redis(self):
        import redis

        return redis.Redis.from_url(self.broker_url)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the process group: the executor's workers and task processes too
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.processes.clear()
        if self._redis_keys_before is not None:  # only the keys this stack's Celery made
            try:
                client = self._redis()
                if new := set(client.keys("*")) - self._redis_keys_before:
                    client.delete(*new)
            except Exception:  # noqa: BLE001 - Redis gone: nothing of ours is left there either
                pass
            self._redis_keys_before = None
        if self._admin is not None and self.database and not self.keep_database:
            with self._admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
            self.database = None
        if self._admin is not None:
            self._admin.dispose()
            self._admin = None
        if self.home and not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)

    # --- waiting --------------------------------------------------------------------------------

    def logs_tail(self, lines: int = 25) -> str:
        out = []
        for component in self.processes:
            path = self.logs / f"{component}.log"
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {component} ({path}) ---\n" + "\n".join(tail))
        return "\n".join(out)

    def _check_alive(self) -> None:
        for component, process in self.processes.items():
            if component not in self.killed and process.poll() is not None:
                raise StackError(f"{component} exited with {process.returncode}\n{self.logs_tail()}")

    def wait_until(self, what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        """Call ``probe`` until it returns something true; StackError with the logs after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs_tail()}")
            time.sleep(interval)

    def wait_healthy(self) -> None:
        wanted = {"api-server": "metadatabase", "scheduler": "scheduler", "dag-processor": "dag_processor",
                  "triggerer": "triggerer"}
        expected = [wanted[c] for c in self.components if c in wanted]

        def healthy():
            try:
                health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            return all((health.get(part) or {}).get("status") == "healthy" for part in expected)

        self.wait_until("the components to report healthy", healthy, self.startup_timeout, interval=1)
        if self.workers:
            from celery import Celery

            app = Celery(broker=self.broker_url)
            wanted = {f"{name}@{name}" for name in self.workers}

            def workers_up():
                replies = app.control.ping(timeout=1.0) or []
                return wanted <= {worker for reply in replies for worker in reply}

            self.wait_until("the Celery workers to answer", workers_up, self.startup_timeout)

    def client(self) -> StackClient:
        return StackClient(self)


class StackClient:
    """The REST API v2 as an operator's script uses it: a token from /auth/token, then JSON calls."""

    def __init__(self, stack: AirflowStack):
        self.stack = stack
        self.http = httpx.Client(base_url=f"{stack.url}/api/v2", timeout=60,
                                 headers={"Authorization": f"Bearer {stack.token()}"})

    def request(self, method: str, path: str, **kwargs) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise StackError(f"{method} {path}: {response.status_code} {response.text[:2000]}")
        return response.json() if response.content else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        def parsed():
            response = self.http.get(f"/dags/{dag_id}")
            return response.json() if response.status_code == 200 else None

        return self.stack.wait_until(f"DAG {dag_id} to be parsed", parsed, timeout)

    def unpause(self, dag_id: str) -> dict:
        return self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def runs(self, dag_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]

    def trigger(self, dag_id: str, *, logical_date: str | None = None, conf: dict | None = None,
                run_id: str | None = None) -> dict:
        body = {"logical_date": logical_date, "conf": conf or {}, **({"dag_run_id": run_id} if run_id else {})}
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def wait_for_run(self, dag_id: str, run_id: str, states: set[str], timeout: float = 300,
                     interval: float = 0.5) -> dict:
        def reached():
            run = self.run(dag_id, run_id)
            return run if run["state"] in states else None

        return self.stack.wait_until(f"run {run_id} to be {sorted(states)}", reached, timeout, interval)

    def task_instances(self, dag_id: str, run_id: str, task_id: str | None = None) -> list[dict]:
        params = {"limit": 1000, **({"task_id": task_id} if task_id else {})}
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params=params)["task_instances"]

    def wait_for_task(self, dag_id: str, run_id: str, predicate: Callable[[dict], bool], what: str,
                      timeout: float = 300, interval: float = 0.3) -> dict:
        def found():
            return next((ti for ti in self.task_instances(dag_id, run_id) if predicate(ti)), None)

        return self.stack.wait_until(what, found, timeout, interval)

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The task log of one try as the UI shows it: one line per event."""
        body = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                            params={"map_index": map_index, "full_content": True},
                            headers={"Accept": "application/json"})
        content = body.get("content", [])
        if isinstance(content, str):
            return content
        return "\n".join(json.dumps(e) if not isinstance(e, str) else e for e in content)

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict]:
        """Every try of one task instance, with the host that ran it."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries"
        return self.request("GET", path)["task_instances"]

    def hitl_details(self, dag_id: str, run_id: str) -> list[dict]:
        """The run's Human-in-the-loop requests (Browse → Required Actions), answered or not."""
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/hitlDetails")["hitl_details"]

    def answer(self, dag_id: str, run_id: str, task_id: str, chosen: list[str], map_index: int = -1) -> dict:
        """Answer a waiting Human-in-the-loop request as the UI's Required Actions does."""
        return self.request("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails",
                            json={"chosen_options": chosen})

    def clear(self, dag_id: str, run_id: str, task_ids: list | None = None, **body) -> list[dict]:
        """``clearTaskInstances`` with the API's own defaults for whatever ``body`` leaves out (only failed,
        no downstream); ``dry_run`` is false here, as an operator means it."""
        payload = {"dry_run": False, "dag_run_id": run_id, **({"task_ids": task_ids} if task_ids else {}), **body}
        return self.request("POST", f"/dags/{dag_id}/clearTaskInstances", json=payload)["task_instances"]

