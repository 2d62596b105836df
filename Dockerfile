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
# 50061 is Envoy's ext_authz HTTP check (deploy/envoy/envoy.yaml).
ENV AUTHSVC_LISTEN=0.0.0.0:50051 \
    AUTHSVC_HTTP_AUTHZ_LISTEN=0.0.0.0:50061 \
    AUTHSVC_DATA_DIR=/var/lib/authsvc
EXPOSE 50051 50061
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["authsvc", "healthcheck"]
STOPSIGNAL SIGTERM
CMD ["authsvc", "serve"]
