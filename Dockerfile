# cds-service: CDS Hooks coverage requirements service.
# Build: docker build -t cds-service .
# Run:   docker run -p 8080:8080 -v "$PWD/cds.toml:/etc/cds/cds.toml:ro" cds-service
# The config must enable JWT authentication: the service refuses to listen on 0.0.0.0 without it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY cds_service ./cds_service
COPY policies ./policies
COPY cards ./cards
RUN pip install . && rm -rf /build

RUN useradd --system --uid 10001 --home-dir /var/lib/cds --create-home cds
USER cds
WORKDIR /var/lib/cds

EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health').status != 200)"
CMD ["cds-service", "serve", "--host", "0.0.0.0", "--port", "8080", "--config", "/etc/cds/cds.toml"]
