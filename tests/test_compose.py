"""The production stack as docker-compose.yaml describes it, read without Docker: services, image, secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker"}
SHARED_SECRETS = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def airflow_services(compose) -> dict:
    return {name: s for name, s in compose["services"].items() if name in AIRFLOW_SERVICES}


def pinned(package: str) -> str:
    [version] = re.findall(rf"^{re.escape(package)}==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    return version


def test_the_stack_has_the_official_services_and_a_mail_server(compose):
    assert AIRFLOW_SERVICES | {"postgres", "redis", "mailpit"} <= set(compose["services"])


def test_every_airflow_component_runs_one_image_whose_tag_is_the_pinned_airflow(airflow_services):
    version = pinned("apache-airflow")
    images = {s["image"] for s in airflow_services.values()}
    assert len(images) == 1
    [image] = images
    assert image.rsplit(":", 1)[1].removesuffix("}") == version
    assert all(s["build"] == "." for s in airflow_services.values())
    base = re.search(r"^FROM apache/airflow:(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert base.split("-")[0] == version


def test_the_auth_manager_is_fabs_from_a_pinned_provider_and_the_one_the_e2e_tests_run(airflow_services):
    """The image installs requirements.txt: the provider must be pinned there, not left to the base image."""
    from dev.airflow_stack import AUTH_MANAGERS

    managers = {s["environment"]["AIRFLOW__CORE__AUTH_MANAGER"] for s in airflow_services.values()}
    assert managers == {AUTH_MANAGERS["fab"]}
    assert AUTH_MANAGERS["fab"].startswith("airflow.providers.fab.")
    assert pinned("apache-airflow-providers-fab")


def test_the_celery_executor_with_redis_and_postgresql(airflow_services):
    for name, service in airflow_services.items():
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql"), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        assert env["AIRFLOW_CONN_MAILING_LEDGER"].startswith("postgresql://"), name
    assert airflow_services["airflow-worker"]["command"] == "celery worker"


@pytest.mark.parametrize("secret", SHARED_SECRETS)
def test_every_component_takes_the_same_secret_from_env_and_none_is_in_the_repository(airflow_services, secret):
    values = {s["environment"][secret] for s in airflow_services.values()}
    assert len(values) == 1, values
    [variable] = re.fullmatch(r"\$\{(\w+):\?set \1 in \.env\}", values.pop()).groups()  # required, no default
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example[variable] == ""


def test_env_example_lists_every_setting_the_compose_file_reads():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "docker-compose.yaml").read_text()))
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    assert used - listed == set()
    assert "/.env" in (ROOT / ".gitignore").read_text().split()  # the filled-in secrets stay out of git


def test_the_project_is_mounted_and_the_health_checks_are_there(compose, airflow_services):
    for name, service in airflow_services.items():
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/include", "/opt/airflow/config"} <= mounts, name
        if name != "airflow-init":
            assert service["healthcheck"]["test"], name
    for name in ("postgres", "redis", "mailpit"):
        assert compose["services"][name]["healthcheck"]["test"], name


def test_init_migrates_and_creates_the_admin(compose):
    init = compose["services"]["airflow-init"]
    assert init["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    assert init["environment"]["_AIRFLOW_WWW_USER_CREATE"] == "true"
    assert "pool" not in " ".join(init["command"])  # the night needs no pool (tests/test_dag_integrity.py)


def settings_the_code_reads() -> set[str]:
    """Every INVOICE_MAILING_* environment variable the DAGs, the package and the local settings read."""
    code = "\n".join(p.read_text() for folder in ("include", "dags", "config") for p in (ROOT / folder).rglob("*.py"))
    budgets = set(re.findall(r'from_env\(\s*"(INVOICE_MAILING_[A-Z_]+)"', code))  # PREFIX_SECONDS, PREFIX_BYTES
    names = set(re.findall(r'"(INVOICE_MAILING_[A-Z_]+)"', code)) - budgets
    return names | {f"{prefix}_{part}" for prefix in budgets for part in ("SECONDS", "BYTES")}


def test_every_setting_the_code_reads_reaches_every_airflow_component_from_env(airflow_services):
    """A deployer sets INVOICE_MAILING_* in .env (archive, concurrency, finish-by, retries...): each one
    reaches the scheduler, the dag-processor and the workers, and .env.example names it with its default."""
    settings = settings_the_code_reads()
    assert {"INVOICE_MAILING_ARCHIVE", "INVOICE_MAILING_CONCURRENCY", "INVOICE_MAILING_FINISH_BY",
            "INVOICE_MAILING_RETRIES", "INVOICE_MAILING_TEMPLATE_BYTES"} <= settings
    for name, service in airflow_services.items():
        assert {"path": ".env", "required": False} in service["env_file"], name
        # an explicit entry would override .env with its own default: the code's default is the one
        assert not {key for key in service.get("environment", {}) if key.startswith("INVOICE_MAILING_")}, name
    example = set(re.findall(r"^(?:# )?(INVOICE_MAILING_[A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert settings - example == set()
