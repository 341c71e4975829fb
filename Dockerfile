# cds-service: CDS Hooks coverage requirements service.
# Build: docker build -t cds-service .   (podman: podman build --format docker -t cds-service ., or the HEALTHCHECK is dropped)
# Run:   see README.md, "Docker": mount a config at /etc/cds/cds.toml and a volume at /var/lib/cds.
# The config must enable JWT authentication: the service refuses to listen on 0.0.0.0 without it.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md constraints.txt ./
COPY cds_service ./cds_service
COPY policies ./policies
COPY cards ./cards
# Every dependency, and the build backend, at the version constraints.txt pins (CI installs from it too).
RUN PIP_CONSTRAINT=/build/constraints.txt pip install . && rm -rf /build

# A numeric user, so that Kubernetes' runAsNonRoot can verify it, owning the data directory: the SQLite
# database (audit log, feedback, JWT replay store) and the audit spool live there. It is a volume: mount
# one (README), or the data goes with the container.
RUN groupadd --system --gid 10001 cds \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cds --no-create-home --shell /usr/sbin/nologin cds \
 && mkdir -p /var/lib/cds \
 && chown 10001:10001 /var/lib/cds
VOLUME /var/lib/cds
WORKDIR /var/lib/cds
USER 10001:10001

# The port the service listens on; the health check follows it (docker run -e CDS_PORT=9000 -p 9000:9000).
ENV CDS_PORT=8080
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('CDS_PORT', '8080'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status != 200)"]
# exec: the service is PID 1 and gets SIGTERM itself (a graceful stop spools what the audit writer holds)
CMD ["sh", "-c", "exec cds-service serve --host 0.0.0.0 --port \"$CDS_PORT\" --config /etc/cds/cds.toml"]
