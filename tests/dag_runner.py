"""A real DAG run in its own process (for the crash test): python -m tests.dag_runner LOGICAL_DATE RUN_AFTER.

The same RUN_AFTER a second time is the same run cleared and run again, as an operator does in the UI.
Exits 0 when the run succeeded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pendulum
from airflow.dag_processing.dagbag import DagBag

ROOT = Path(__file__).resolve().parents[1]


def main(logical_date: str, run_after: str) -> int:
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing")
    run = dag.test(logical_date=pendulum.parse(logical_date), run_after=pendulum.parse(run_after))
    return 0 if run.state == "success" else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
