#!/usr/bin/env bash
# Installs everything qtrainer needs on a fresh Debian/Ubuntu machine: the Fashion-MNIST data
# (Debian package dataset-fashion-mnist), headless Chromium (best effort) and the Python package with its
# test, openvino and onnx extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "install.sh: no apt-get here; put the Fashion-MNIST *-ubyte.gz files in a directory and set QTRAINER_FASHION_MNIST" >&2
  fi
fi
# headless Chromium for the browser check of the TensorBoard pages (best effort: that test skips without it)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
    || echo "install.sh: chromium could not be installed; tests/loggers/test_tensorboard_browser.py will skip" >&2
fi
python3 -m pip install -q -e ".[test,openvino,onnx]"
