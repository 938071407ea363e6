#!/usr/bin/env bash
# Installs the Debian packages the gateway's tests and `dev` command run: redis-server,
# redis-sentinel, redis-tools (redis-cli, redis-benchmark), openssl (certificates for the TLS
# tests and `cluster up --secure`). Does nothing when they are present.
set -euo pipefail
missing=()
for bin in redis-server redis-sentinel redis-cli redis-benchmark openssl; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages for: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server redis-sentinel redis-tools \
  openssl >/dev/null
# The packages start system services where an init system runs; the gateway never uses them.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now redis-server redis-sentinel >/dev/null 2>&1 || true
fi
