# The factorywatch broker: Debian's Mosquitto (2.0.11 on bookworm, the version the tests
# run) with the project's config and ACL. Users, passwords and certificates are mounted
# (`factorywatch broker init` makes them); see docker-compose.yml.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto mosquitto-clients \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
    && mkdir -p /mosquitto/config /mosquitto/data /mosquitto/certs /mosquitto/secrets \
    && chown mosquitto:mosquitto /mosquitto/data
COPY broker/mosquitto.conf broker/acl /mosquitto/config/
USER mosquitto
EXPOSE 1883 8883
CMD ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
