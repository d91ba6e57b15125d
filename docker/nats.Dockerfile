# A node of the factorywatch NATS cluster (compose profile `cluster`): Debian's nats-server
# (2.9.10 on bookworm, the version the cluster tests run), non-root. Its config is rendered by
# `factorywatch cluster config` into a volume (docker-compose.yml); nothing is baked in here.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends nats-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
    && mkdir -p /data \
    && chown 10001:10001 /data
# The health check asks the monitoring port's /healthz (200 once JetStream has a meta leader
# and is current) with bash's /dev/tcp: no curl or wget in the image.
COPY docker/nats-healthcheck.sh /usr/local/bin/nats-healthcheck
USER 10001:10001
EXPOSE 4222 6222 1883 8222
CMD ["nats-server", "-c", "/config/nats.conf"]
