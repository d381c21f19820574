# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: venv catalogs demo test e2e-celery lint bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Compile the gettext catalogs of the report labels (.po -> .mo).
catalogs: venv
	$(VENV)/bin/pybabel --quiet compile -d include/templates/locale -D messages

demo: venv catalogs
	$(PY) -m include.invoice_mailing.demo run

test: venv catalogs
	$(PY) -m pytest -q --ignore=tests/e2e

# The distributed engine without Docker: Airflow's components and two Celery workers as processes,
# PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379; a night with one worker SIGKILLed (about 2 minutes).
e2e-celery: venv catalogs
	$(PY) -m pytest -q -s tests/e2e/test_celery.py

lint: venv
	$(VENV)/bin/ruff check .

bench: venv catalogs
	$(PY) bench/render.py

clean:
	rm -rf demo .pytest_cache
