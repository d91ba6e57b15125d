# Prometheus Alertmanager for the compose stack: Debian's prometheus-alertmanager (0.25 on
# bookworm, the version the tests run). alertmanager.yml is mounted from deploy/alertmanager
# (see docker-compose.yml); silences and notification state live on a volume at /alertmanager.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus-alertmanager \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
        /usr/share/doc/* /usr/share/man/* \
    && mkdir -p /alertmanager \
    && chown prometheus:prometheus /alertmanager
USER prometheus
EXPOSE 9093
# --cluster.listen-address= : a single Alertmanager, no gossip port.
CMD ["prometheus-alertmanager", "--config.file=/etc/alertmanager/alertmanager.yml", \
     "--storage.path=/alertmanager", "--cluster.listen-address="]
