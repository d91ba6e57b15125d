#!/bin/bash
# Healthy when the node's monitoring port answers /healthz with 200: JetStream is enabled,
# has a meta leader and is current (nats-server 2.9). bash's /dev/tcp: no curl in the image.
set -eu
port=${1:-8222}
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 3 _ status _ <&3
[ "$status" = 200 ]
