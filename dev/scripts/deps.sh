#!/usr/bin/env bash
# Installs what building, running and testing Otherix needs on Debian 12 or
# Ubuntu 24.04. Idempotent: installs only what is missing, so it is cheap to
# run before every build.
set -euo pipefail
cd "$(dirname "$0")/../.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

need=()
for p in etcd-server protobuf-compiler libprotobuf-dev python3-venv ca-certificates curl jq openssl nghttp2-client \
         genisoimage dosfstools mtools fdisk cpio socat chromium; do
  installed "$p" || need+=("$p")
done
command -v npm >/dev/null 2>&1 || need+=(npm)

# QEMU: some Debian 12 machines carry qemu-utils from backports, which
# conflicts with bookworm's qemu-system-x86 (7.2); a plain install would
# remove qemu-img. Pin qemu-utils to bookworm only in that case.
qemu=()
installed qemu-system-x86 || qemu+=(qemu-system-x86)
installed qemu-utils || qemu+=(qemu-utils)
downgrade=()
if ((${#qemu[@]})) && installed qemu-utils && ! installed qemu-system-x86; then
  have=$(dpkg-query -W -f='${Version}' qemu-utils)
  $SUDO apt-get update -qq
  want=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  if [ -n "$want" ] && dpkg --compare-versions "$have" gt "$want" &&
     apt-cache madison qemu-utils | grep -q ' bookworm/'; then
    qemu=(qemu-system-x86 qemu-utils/bookworm)
    downgrade=(--allow-downgrades)
  fi
fi
need+=("${qemu[@]}")

# The test image is built from Debian packages (apt-get download), which
# needs package lists even when nothing is missing.
if ((${#need[@]})) || [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -1)" ]; then
  $SUDO apt-get update -qq
fi

if ((${#need[@]})); then
  echo ">> installing: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${downgrade[@]}" "${need[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "Rust is missing: install Rust 1.95 or newer (https://rustup.rs), then run this again." >&2
  exit 1
fi

# buf, pinned in package.json.
if [ ! -x node_modules/.bin/buf ]; then
  npm ci --no-audit --no-fund --silent
fi

# The generated-client and browser tests' npm packages (protoc-gen-es,
# connect-web, puppeteer-core), pinned in clients/ts/package-lock.json.
if [ ! -d clients/ts/node_modules/@connectrpc/connect-web ] || [ clients/ts/package-lock.json -nt clients/ts/node_modules/.package-lock.json ]; then
  (cd clients/ts && npm ci --no-audit --no-fund --silent)
fi
