# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: venv catalogs demo airflow test lint bench clean

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

# A real Airflow (api-server, scheduler, dag-processor, triggerer; PostgreSQL metadata) with the demo ERP.
airflow: venv catalogs
	$(PY) -m tests.airflow_stack

test: venv catalogs
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: venv catalogs
	$(PY) bench/render.py

clean:
	rm -rf demo .pytest_cache
