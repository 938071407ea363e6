#!/usr/bin/env bash
# Installs the peer the benchmarks compare against: sockudo (a Rust Pusher-protocol server) from
# crates.io, with its Redis adapter, into .work/peers/sockudo (ignored by git). Needs cargo and
# two Debian packages, installed here when missing: protobuf-compiler (protoc) and
# libprotobuf-dev (the well-known .proto files such as google/protobuf/timestamp.proto, which
# protoc alone does not ship). The default cargo features have no Redis adapter, so two sockudo
# nodes could not share state without `--features redis`.
# Does nothing when the binary is already there. Takes about 15 minutes on 2 cores.
set -euo pipefail
VERSION="${SOCKUDO_VERSION:-5.2.0}"
ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${SOCKUDO_ROOT:-$ROOT_DIR/.work/peers/sockudo}"
BIN="$DEST/bin/sockudo"
if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
  echo "sockudo $VERSION already at $BIN"
  exit 0
fi
command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required: https://rustup.rs"; exit 1; }
WELL_KNOWN=/usr/include/google/protobuf/timestamp.proto
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
[ -f "$WELL_KNOWN" ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages ${missing[*]} (sockudo's build needs protoc and $WELL_KNOWN)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v protoc >/dev/null && [ -f "$WELL_KNOWN" ] || {
  echo "protoc or $WELL_KNOWN still missing after installing protobuf-compiler and libprotobuf-dev"
  exit 1
}
echo "building sockudo $VERSION (features: redis) into $DEST; this takes a while"
cargo install sockudo --version "$VERSION" --features redis --locked --root "$DEST"
"$BIN" --version
