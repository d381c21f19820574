-- The pipeline's own ledger, and the `erp` database that `docker compose --profile demo run erp-demo` seeds.
CREATE DATABASE mailing_ledger OWNER airflow;
CREATE DATABASE erp OWNER airflow;
