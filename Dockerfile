# syntax=docker/dockerfile:1
#
# smtp-graph-relay container image (DESIGN §9). Build:  docker build -t smtp-graph-relay .
# Run and compose examples: docker/README.md. Promises checked by tests/unit/test_dockerfile.py.
#
# Two stages: the builder makes a wheel of the project and installs it into /opt/venv; the final
# image gets only /opt/venv on top of a clean python:3.11-slim (no source tree, no build tools,
# no pip cache), runs as the fixed non-root UID/GID 10025, listens on high ports only and keeps
# its spool on a volume.

# --- builder: wheel -> /opt/venv -------------------------------------------------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel needs (.dockerignore keeps everything else out of the build context).
COPY pyproject.toml README.md ./
COPY relay/ relay/

# The venv gets no pip of its own: the builder's pip installs into it (--python), so the final
# image carries the relay and its dependencies and nothing to install more with.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir /wheels/*.whl \
 && /opt/venv/bin/smtp-graph-relay --version

# --- final image -----------------------------------------------------------------------------
FROM python:3.11-slim

# No org.opencontainers.image.source: the project has no public repository URL to name, and a
# made-up one would send people (and scanners that follow it) to someone else's repository.
# Whoever publishes the image adds it at build time:
#   docker build --label org.opencontainers.image.source=https://git.example.com/smtp-graph-relay .
LABEL org.opencontainers.image.title="smtp-graph-relay" \
      org.opencontainers.image.description="Plain SMTP in, Microsoft Graph sendMail out: a relay for printers, scanners and legacy software." \
      org.opencontainers.image.licenses="MIT"

# A fixed UID/GID so volume and secret file ownership can be set on the host
# (chown 10025:10025). No home directory, no login shell. The spool directory is created here,
# owned by the relay user with mode 0700, before VOLUME: a new named volume copies both.
RUN groupadd --system --gid 10025 relay \
 && useradd --system --uid 10025 --gid 10025 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin relay \
 && install -d -m 0700 -o 10025 -g 10025 /var/lib/smtp-graph-relay \
 && install -d -m 0755 /etc/smtp-graph-relay

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# The spool: messages answered with 250 live here until Graph accepted them. Keep it on a
# volume that outlives the container.
VOLUME ["/var/lib/smtp-graph-relay"]
# Config (mount read-only): /etc/smtp-graph-relay/config.yaml. Secrets: files under
# /run/secrets (Docker/Compose secrets or read-only bind mounts), named by client_secret_file.

USER 10025:10025

# 2525 SMTP (+STARTTLS), 4650 implicit TLS: high ports, so no capability is needed; map host
# port 25 to 2525 with -p 25:2525. 9025 is the admin endpoint (/healthz, /metrics); it is bound
# to 127.0.0.1 inside the container unless admin.address says otherwise.
EXPOSE 2525 4650 9025

# Runs inside the container, so the default loopback admin binding is enough. urllib, because
# slim images have no curl; ProxyHandler({}) so an HTTP(S)_PROXY meant for Graph is not used.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9025/healthz', timeout=4)"]

# SIGTERM: stop accepting, finish or requeue what is in flight, exit 0. That takes up to about
# 30 s, more than Docker's default 10 s grace: run with --stop-timeout 60 (stop_grace_period in
# Compose).
STOPSIGNAL SIGTERM

ENTRYPOINT ["smtp-graph-relay"]
CMD ["serve", "-c", "/etc/smtp-graph-relay/config.yaml"]
