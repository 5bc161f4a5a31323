#!/usr/bin/env bash
# Installs airnode on a fresh Debian/Ubuntu machine: system peers (dcmtk, dicom3tools,
# Orthanc, Chromium for the status-page test, Node.js for the viewer-library checks)
# and a virtual environment in .venv. With --dev, also the npm packages (dcmjs and the
# Cornerstone adapters, pinned in tests/js/package-lock.json) that the tests use to
# load our SR and SEG the way OHIF does.
# Usage: bash scripts/install.sh [--no-system] [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

system=1
extras="train"
for arg in "$@"; do
  case "$arg" in
    --no-system) system=0 ;;
    --dev) extras="train,test,postgres" ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

if [ "$system" = 1 ]; then
  pkgs="dcmtk dicom3tools orthanc orthanc-dicomweb chromium postgresql"
  # Node.js and npm for the viewer-library checks, unless a Node.js is already there.
  if [ "$extras" != "train" ] && ! command -v npm >/dev/null 2>&1; then
    pkgs="$pkgs nodejs npm"
  fi
  missing=""
  for p in $pkgs; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
  fi
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch first: any other version would pull gigabytes of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$extras]"
if [ "$extras" != "train" ]; then
  # Exact versions from the lock file; no install scripts are needed by these packages.
  (cd tests/js && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
fi
echo "airnode installed in .venv ($(.venv/bin/airnode --version 2>/dev/null || echo '?'))"
