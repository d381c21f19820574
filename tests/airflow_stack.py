"""A real Airflow on this machine, without Docker: the components of docker-compose.yaml as processes.

``AirflowStack`` migrates a fresh PostgreSQL metadata database in a temporary AIRFLOW_HOME, then starts
api-server, scheduler, dag-processor and triggerer (and, for the CeleryExecutor, Celery workers) on
free ports, each in its own process group, with one environment: the same JWT secret and API secret
key everywhere and the execution API URL of its api-server. ``StackClient`` speaks the REST API v2
with a token. A worker can run as another host: its own host name and process namespace (``unshare``,
as root), so that it looks to Airflow and to the ledger as a worker on a separate machine does.

    with AirflowStack(executor="CeleryExecutor", workers=("worker-a", "worker-b")) as stack:
        client = stack.client()
        client.wait_for_dag("invoice_mailing")
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
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN = "admin"


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


class StackError(RuntimeError):
    pass


class AirflowStack:
    def __init__(self, *, executor: str = "LocalExecutor", workers: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None, worker_concurrency: int = 2):
        self.executor, self.worker_names, self.worker_concurrency = executor, workers, worker_concurrency
        self.extra_env = extra_env or {}
        self.home = Path(tempfile.mkdtemp(prefix="invoice-mailing-stack-"))
        self.port = free_port()
        self.database = f"im_stack_{uuid.uuid4().hex[:10]}"
        self.queue = f"im_stack_{uuid.uuid4().hex[:10]}"  # this stack's Celery queue in the shared Redis
        self.password = secrets.token_urlsafe(12)
        self.processes: dict[str, subprocess.Popen] = {}
        self.separate_hosts = bool(workers) and can_be_another_host()
        self._redis_keys_before: set[bytes] = set()

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

    # --- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._create_database()
        if self.executor == "CeleryExecutor":
            self._redis_keys_before = set(self._redis().keys("*"))
        (self.home / "passwords.json").write_text(json.dumps({ADMIN: self.password}))
        self.env = self._environment()
        migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env,
                                 capture_output=True, text=True)
        if migrate.returncode:
            raise StackError(f"airflow db migrate failed:\n{migrate.stderr[-3000:]}")
        for component in COMPONENTS:
            self._spawn(component, [sys.executable, "-m", "airflow", *component.split()] +
                        (["--port", str(self.port), "--host", "127.0.0.1"] if component == "api-server" else []))
        for name in self.worker_names:
            self.start_worker(name)
        self.wait_healthy()

    def _create_database(self) -> None:
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.database}"'))
        admin.dispose()

    def database_url(self, name: str | None = None, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{POSTGRES_ADMIN_URL.split('://', 1)[1].rsplit('/', 1)[0]}/{name or self.database}"

    def _environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "PYTHONPATH": str(ROOT),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname",  # no DNS look-up for a worker's host name
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # One secret of each kind for every component, as docker-compose.yaml takes them from .env.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
        })
        if self.executor == "CeleryExecutor":
            env.update({
                "AIRFLOW__CELERY__BROKER_URL": REDIS_URL,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.database_url(driver="postgresql"),
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            })
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.home / f"{name}.log").open("w")
        self.processes[name] = subprocess.Popen(argv, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                                cwd=self.home, start_new_session=True)

    def start_worker(self, name: str) -> None:
        """A Celery worker named ``name``; as root, on its own "host" (host name and process namespace)."""
        env = {**self.env, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
        argv = [sys.executable, "-m", "airflow", "celery", "worker", "--celery-hostname", f"{name}@{name}",
                "--queues", self.queue, "--concurrency", str(self.worker_concurrency)]
        if self.separate_hosts:
            argv = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--",
                    "/bin/sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
        self._spawn(f"worker {name}", argv, env)

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker and everything it started, as if its host had lost power."""
        import psutil

        process = self.processes[f"worker {name}"]
        try:  # the whole tree: Airflow's task supervisors start their own sessions
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(timeout=30)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self.executor == "CeleryExecutor":
            try:
                client = self._redis()
                new = set(client.keys("*")) - self._redis_keys_before
                if new:
                    client.delete(*new)
            except Exception:  # noqa: BLE001 - Redis gone: nothing of ours is left there either
                pass
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(self.home, ignore_errors=True)

    @staticmethod
    def _redis():
        import redis

        return redis.Redis.from_url(REDIS_URL)

    # --- waiting and diagnosis ---------------------------------------------------------------------

    def logs_tail(self, lines: int = 25) -> str:
        out = []
        for name in self.processes:
            path = self.home / f"{name}.log"
            if path.exists():
                out.append(f"--- {name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def check_alive(self, *, except_: tuple[str, ...] = ()) -> None:
        for name, process in self.processes.items():
            if name not in except_ and process.poll() is not None:
                raise StackError(f"{name} exited with {process.returncode}\n{self.logs_tail()}")

    def wait_until(self, what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5,
                   *, dead_ok: tuple[str, ...] = ()) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(except_=dead_ok)
            result = probe()
            if result:
                return result
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs_tail()}")
            time.sleep(interval)

    def wait_healthy(self) -> None:
        def healthy():
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as response:
                    body = json.load(response)
            except (OSError, ValueError):
                return False
            parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
            return all(body.get(p, {}).get("status") == "healthy" for p in parts)

        self.wait_until("a healthy api-server, scheduler, triggerer and dag-processor", healthy, timeout=180)
        if self.worker_names:
            from celery import Celery

            app = Celery(broker=REDIS_URL)
            wanted = {f"{name}@{name}" for name in self.worker_names}

            def workers_up():
                replies = app.control.ping(timeout=1.0) or []
                return wanted <= {worker for reply in replies for worker in reply}

            self.wait_until("the Celery workers to answer", workers_up, timeout=120)

    def client(self) -> StackClient:
        return StackClient(self)


class StackClient:
    """The REST API v2 with the admin's token."""

    def __init__(self, stack: AirflowStack):
        self.stack = stack
        body = json.dumps({"username": ADMIN, "password": stack.password}).encode()
        request = urllib.request.Request(f"{stack.url}/auth/token", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            self.token = json.load(response)["access_token"]

    def request(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            f"{self.stack.url}/api/v2{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise StackError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')[:500]}") from exc

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        def parsed():
            try:
                return self.request("GET", f"/dags/{dag_id}")
            except StackError:
                return None

        return self.stack.wait_until(f"the DAG {dag_id} to be parsed", parsed, timeout)

    def unpause(self, dag_id: str) -> dict:
        return self.request("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    def set_pool(self, name: str, slots: int) -> dict:
        try:
            return self.request("POST", "/pools", {"name": name, "slots": slots})
        except StackError:
            return self.request("PATCH", f"/pools/{name}", {"name": name, "slots": slots})

    def trigger(self, dag_id: str, *, logical_date: str | None = None, conf: dict | None = None) -> dict:
        return self.request("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": logical_date, "conf": conf or {}})

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")

    def wait_for_run(self, dag_id: str, run_id: str, states: set[str], timeout: float = 300,
                     dead_ok: tuple[str, ...] = ()) -> dict:
        def reached():
            run = self.run(dag_id, run_id)
            return run if run["state"] in states else None

        return self.stack.wait_until(f"run {run_id} to reach {states}", reached, timeout, interval=1.0,
                                     dead_ok=dead_ok)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        run = urllib.parse.quote(run_id, safe="")
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run}/taskInstances?limit=1000")["task_instances"]

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict]:
        run = urllib.parse.quote(run_id, safe="")
        path = f"/dags/{dag_id}/dagRuns/{run}/taskInstances/{task_id}/{map_index}/tries"
        return self.request("GET", path)["task_instances"]

