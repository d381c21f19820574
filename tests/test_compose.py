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


def test_init_migrates_creates_the_admin_and_sizes_the_smtp_pool(compose):
    init = compose["services"]["airflow-init"]
    assert init["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    assert init["environment"]["_AIRFLOW_WWW_USER_CREATE"] == "true"
    assert "pools set invoice_mailing_smtp" in " ".join(init["command"])
