# The production image: Airflow 3.3 with the project's pinned packages, WeasyPrint's system libraries
# (Pango, HarfBuzz with its fast subsetter) and the compiled label catalogs.
FROM apache/airflow:3.3.2-python3.11

USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 \
 && rm -rf /var/lib/apt/lists/*
USER airflow

COPY --chown=airflow:root requirements.txt /opt/invoice-mailing/requirements.txt
RUN pip install --no-cache-dir -r /opt/invoice-mailing/requirements.txt

COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root include /opt/airflow/include
COPY --chown=airflow:root plugins /opt/airflow/plugins
COPY --chown=airflow:root config /opt/airflow/config
RUN pybabel --quiet compile -d /opt/airflow/include/templates/locale -D messages
ENV PYTHONPATH=/opt/airflow
