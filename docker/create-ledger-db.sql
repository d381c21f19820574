CREATE DATABASE mailing_ledger OWNER airflow;
