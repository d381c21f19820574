"""Developer tools that are not part of the product: the demo's SMTP sink and a real Airflow as processes.

The DAG and ``include/`` never import this package; the demo, the tests, the benchmarks and ``make airflow`` do.
"""
