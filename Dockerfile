# authsvc: slim, non-root, with a health check.
# Not built in this project's CI (no Docker engine on our machines); kept
# deliberately simple so that it is easy to review.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The client package carries the generated code the server imports.
COPY clients/python ./clients/python
COPY pyproject.toml README.md ./
COPY authsvc ./authsvc
RUN pip install ./clients/python . \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/authsvc authsvc \
    && rm -rf /src

USER authsvc
WORKDIR /var/lib/authsvc
# Listen on all interfaces inside the container. Without AUTHSVC_DATABASE_URL
# the embedded PostgreSQL keeps its data in /var/lib/authsvc (mount a volume);
# in production set AUTHSVC_DATABASE_URL.
# Prometheus scrapes from outside the container, so metrics listen there too.
ENV AUTHSVC_LISTEN=0.0.0.0:50051 \
    AUTHSVC_METRICS_LISTEN=0.0.0.0:9464 \
    AUTHSVC_DATA_DIR=/var/lib/authsvc
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["authsvc", "healthcheck"]
STOPSIGNAL SIGTERM
CMD ["authsvc", "serve"]
