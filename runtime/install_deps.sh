#!/usr/bin/env bash
# What the C++, Node.js and web examples need beyond the Python package (their tests skip without it):
# Debian's cmake, g++, CLI11 and Chromium, and each JavaScript package's locked npm dependencies.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
[ -f /usr/share/cmake/CLI11/CLI11Config.cmake ] || missing+=(libcli11-dev)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "+ apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for package in node web; do  # .npmrc in each: ignore-scripts (see runtime/node/.npmrc)
  echo "+ npm ci --prefix runtime/$package"
  npm ci --prefix "$package" --no-audit --no-fund --loglevel=error
done
