# authsvc: slim, non-root, with a health check.
# Not built in this project's CI: no machine here runs a Docker engine. It is
# linted by hadolint in scripts/check, and kept deliberately simple so that it
# is easy to review.
#
# Run it with admin tokens; without them it refuses to start, because it
# listens on every interface and anyone who reaches the port could manage keys:
#   docker run -e AUTHSVC_ADMIN_TOKENS=<token> -e AUTHSVC_DATABASE_URL=... authsvc
# (AUTHSVC_INSECURE_MANAGEMENT=true starts it open anyway, with a warning.)
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

# Numeric, so that the host and Kubernetes' runAsNonRoot can tell it is not root.
USER 10001
WORKDIR /var/lib/authsvc
# Listen on all interfaces inside the container. Without AUTHSVC_DATABASE_URL
# the embedded PostgreSQL keeps its data in /var/lib/authsvc (mount a volume);
# in production set AUTHSVC_DATABASE_URL.
# Stopping: health turns NOT_SERVING, calls are served for AUTHSVC_DRAIN_SECONDS
# (3 s), then in-flight calls finish; give `docker stop -t` at least 10 s.
#
# In production also mount the TLS files and the admin tokens file (not
# readable by others) and set, for example:
#   AUTHSVC_TLS_CERT_FILE=/run/secrets/authsvc/tls.crt       chain, CA included
#   AUTHSVC_TLS_KEY_FILE=/run/secrets/authsvc/tls.key
#   AUTHSVC_TLS_CLIENT_CA_FILE=/run/secrets/authsvc/clients-ca.crt   (mTLS)
#   AUTHSVC_ADMIN_TOKENS_FILE=/run/secrets/authsvc/admin-tokens      name:token[:orgs]
# The files are re-read when they change. The HEALTHCHECK below reads the
# same settings and speaks TLS (and mTLS) with them; see README, "Running it
# in production".
# 50061 is Envoy's ext_authz HTTP check (deploy/envoy/envoy.yaml). Prometheus
# scrapes from outside the container, so metrics listen there too.
ENV AUTHSVC_LISTEN=0.0.0.0:50051 \
    AUTHSVC_HTTP_AUTHZ_LISTEN=0.0.0.0:50061 \
    AUTHSVC_METRICS_LISTEN=0.0.0.0:9464 \
    AUTHSVC_DATA_DIR=/var/lib/authsvc
EXPOSE 50051 50061 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["authsvc", "healthcheck"]
STOPSIGNAL SIGTERM
CMD ["authsvc", "serve"]
