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
# (the embedded default with server.data_dir: /data) - mount your own file over it (keep
# `server.data_dir: /data` in it), and/or set TRIVY_GATEWAY_* env variables (TRIVY_GATEWAY_LISTEN,
# _ADMIN_LISTEN, _MIRROR_LISTEN, _DATA_DIR, _LOG_LEVEL, _LOG_FORMAT, _CACHE_MAX_SIZE; TRIVY_GATEWAY_PROXY_PASSWORD
# when proxy auth is enabled, TRIVY_GATEWAY_ADMIN_TOKEN to protect the admin port).

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
# the image keeps its state in the /data volume: said in the shipped file, not by an env variable
RUN sed -i 's|^  data_dir: .*$|  data_dir: /data                 # the image volume|' \
      /etc/trivy-gateway/gateway.yaml \
 && grep -q '^  data_dir: /data ' /etc/trivy-gateway/gateway.yaml

# Only the config path is set here: env variables win over the YAML file, so setting the listen
# addresses or the data dir in the image would silently override a mounted gateway.yaml.
ENV TRIVY_GATEWAY_CONFIG=/etc/trivy-gateway/gateway.yaml

# /data: CA (ca/ca.pem, ca/ca-key.pem), cache and state. /export: optional place for
# `trivy-gateway ca bundle > /export/bundle.pem` so other containers can trust the CA.
VOLUME ["/data"]
EXPOSE 3128 9128 5000
USER trivy-gateway:trivy-gateway
WORKDIR /data

# Asks /healthz on the admin port of the effective configuration (file + env), bypassing any
# *_proxy variable, so moving server.admin_listen in a mounted YAML keeps the check working.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["trivy-gateway", "healthcheck"]

STOPSIGNAL SIGTERM
CMD ["trivy-gateway", "serve"]
