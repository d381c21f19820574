# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Test processes: each takes whole test files (module fixtures such as Dovecot start once); `make test TEST_WORKERS=0` runs one.
TEST_WORKERS ?= 2
export PYTHONPATH := $(CURDIR)

.PHONY: venv catalogs demo airflow airflow-stop test e2e-celery lint bench bench-night clean audit-export audit-ui screenshots \
	check-mail-accounts

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# Compile the gettext catalogs of the report labels (.po -> .mo).
catalogs: venv
	$(VENV)/bin/pybabel --quiet compile -d include/templates/locale -D messages

demo: venv catalogs
	$(PY) -m include.invoice_mailing.demo run

# A real Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor, PostgreSQL metadata) with the
# demo ERP and an SMTP sink, detached; kept in demo/airflow/ between starts. `make airflow-stop` ends it.
airflow: venv catalogs
	$(PY) -m dev.airflow_tool start

airflow-stop: venv
	$(PY) -m dev.airflow_tool stop

test: venv catalogs
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 --ignore=tests/e2e/test_celery.py

# The distributed engine without Docker: Airflow's components and two Celery workers as processes,
# PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379; a night with one worker SIGKILLed (about 2 minutes).
e2e-celery: venv catalogs
	$(PY) -m pytest -q -s tests/e2e/test_celery.py

# Before the first night: every email account of the ERP gets its token (OAuth 2.0), opens its SMTP session and
# logs in, then the bounce mailbox; one line each, ok or why not; nothing is sent. The Airflow connections are
# the deployment's (AIRFLOW_HOME, or AIRFLOW_CONN_* in the environment).
check-mail-accounts: venv
	$(PY) -m include.invoice_mailing.mail_accounts

# One night's deliveries as CSV and JSON Lines in exports/, from LEDGER (a SQLAlchemy URL; the demo's is
# sqlite:///demo/ledger.db) or else Airflow's mailing_ledger connection; it names the ledger it read, and
# refuses when there is neither.
audit-export: venv
	@test -n "$(DATE)" || { echo "usage: make audit-export DATE=2026-11-24 [LEDGER=sqlite:///demo/ledger.db]"; exit 2; }
	$(PY) -m include.invoice_mailing.audit export --date $(DATE) $(if $(LEDGER),--ledger $(LEDGER)) --out exports

# The auditors' pages of `make demo`'s ledger: the api-server alone, at http://localhost:8081/plugin/invoice-mailing
# (AUDIT_PORT), with `make airflow`'s login, which it prints; Ctrl-C ends it.
audit-ui: venv
	$(PY) -m dev.airflow_tool audit-ui

# The README's pictures of the UI (docs/night-*.png, docs/audit-*.png), all from one real night in headless
# Chromium (dev/screenshots.py; about 2 minutes). It rewrites docs/, so it is no part of `make test`.
screenshots: venv catalogs
	$(PY) -m dev.screenshots

lint: venv
	$(VENV)/bin/ruff check .

bench: venv catalogs
	$(PY) bench/render.py

# A night of 20,000 documents in a real Airflow against the plain loop (about 25 minutes on 2 cores).
bench-night: venv catalogs
	$(PY) bench/night.py $(if $(DOCUMENTS),--documents $(DOCUMENTS))

clean:
	rm -rf demo exports .pytest_cache
