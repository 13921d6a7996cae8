#!/usr/bin/env bash
# Installs Debian's Fashion-MNIST package when apt is usable (root or passwordless sudo).
# Optional: without it, the Fashion-MNIST loader falls back to the Hugging Face cache.
set -u
[ -d /usr/share/datasets/fashion-mnist ] && exit 0
command -v apt-get >/dev/null 2>&1 || { echo "apt-get not found: skipping dataset-fashion-mnist"; exit 0; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
  || echo "could not install dataset-fashion-mnist (optional)"
exit 0
