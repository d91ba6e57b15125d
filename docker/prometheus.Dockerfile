# Prometheus for the compose stack: Debian's package (2.42 on bookworm, the version the tests
# run). The configuration is mounted from deploy/prometheus (see docker-compose.yml); the
# time series live on a volume at /prometheus.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# Without moment-timezone's per-zone source data (212 MB): the web UI loads its bundled .js.
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
        /usr/share/doc/* /usr/share/man/* \
    && rm -rf /usr/share/javascript/moment-timezone/data \
    && mkdir -p /prometheus \
    && chown prometheus:prometheus /prometheus
USER prometheus
EXPOSE 9090
CMD ["prometheus", "--config.file=/etc/prometheus/prometheus.yml", \
     "--storage.tsdb.path=/prometheus", "--web.listen-address=:9090"]
