# syntax=docker/dockerfile:1
# trivy-gateway container image.
#
#   docker build -t trivy-gateway .
#   docker run -d -p 3128:3128 -p 9128:9128 -v trivy-gateway-data:/data trivy-gateway
#
# Proxy clients use HTTPS_PROXY=http://<host>:3128; /metrics, /healthz, /readyz, /ca.pem and the
# status page are on :9128. Port 5000 is the mirror door (registry / Maven / VEX mirror for scanners
# without the CA) when server.mirror_listen is set, e.g. "0.0.0.0:5000" (off by default). The CA, the cache and state live in the /data volume; keep it, or
# every client has to trust a new CA. Configuration: the shipped /etc/trivy-gateway/gateway.yaml
# (a copy of the embedded default) - mount your own file over it, and/or set TRIVY_GATEWAY_* env
# variables (TRIVY_GATEWAY_LISTEN, _ADMIN_LISTEN, _MIRROR_LISTEN, _DATA_DIR, _LOG_LEVEL, _LOG_FORMAT,
# _CACHE_MAX_SIZE; TRIVY_GATEWAY_PROXY_PASSWORD when proxy auth is enabled).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# optional extras in the image: `scale` (redis, aiobotocore) lets the same image run as one of
# several replicas (cache.shared, docs/scale-out.md); imported only when configured.
# `--build-arg EXTRAS=` builds the single-process image without them.
ARG EXTRAS=scale
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

FROM ${PYTHON_IMAGE}
ARG GATEWAY_UID=10001
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install /wheels/*.whl \
 && groupadd --system --gid "${GATEWAY_UID}" trivy-gateway \
 && useradd --system --uid "${GATEWAY_UID}" --gid trivy-gateway --home-dir /data \
      --no-create-home --shell /usr/sbin/nologin trivy-gateway \
 && mkdir -p /data /etc/trivy-gateway /export \
 && chown trivy-gateway:trivy-gateway /data /export \
 && chmod 0750 /data
COPY --chown=root:root --chmod=0644 config/gateway.yaml /etc/trivy-gateway/gateway.yaml

# Only the config path and the data dir are set here: env variables win over the YAML file, so
# setting the listen addresses in the image would silently override a mounted gateway.yaml.
ENV TRIVY_GATEWAY_CONFIG=/etc/trivy-gateway/gateway.yaml \
    TRIVY_GATEWAY_DATA_DIR=/data

# /data: CA (ca/ca.pem, ca/ca-key.pem), cache and state. /export: optional place for
# `trivy-gateway ca bundle > /export/bundle.pem` so other containers can trust the CA.
VOLUME ["/data"]
EXPOSE 3128 9128 5000
USER trivy-gateway:trivy-gateway
WORKDIR /data

# No curl in the slim image: ask /healthz with the standard library, bypassing any *_proxy env.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('TRIVY_GATEWAY_ADMIN_LISTEN', '0.0.0.0:9128').rpartition(':')[2]; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % port, timeout=4).read()"]

STOPSIGNAL SIGTERM
CMD ["trivy-gateway", "serve"]
