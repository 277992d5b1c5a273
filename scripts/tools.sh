# Sourced by scripts/test and scripts/quickstart: installs what is missing and exports where it is.
# Debian packages with apt-get (root or sudo), anvil/cast from npm and Python checkers from PyPI
# into the git-ignored .tools/ directory. Idempotent: a second run installs nothing.
set -euo pipefail

CASTELLAN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$CASTELLAN_ROOT/.tools"
mkdir -p "$TOOLS"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root (or sudo) to install: $*" >&2; return 1; fi
}

apt_missing=()
need_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || apt_missing+=("$1"); }
need_pkg softhsm2
need_pkg opensc
need_pkg stunnel4
# openssl s_client (signer/tests/tls_attacks.rs offers TLS 1.2 with it).
need_pkg openssl
need_pkg gdb  # signer/tests/hsm_faults.rs closes the signer's PKCS#11 sessions from outside
need_pkg e2fsprogs  # signer/tests/store_faults.rs: mkfs.ext4 and chattr for the read-only store
need_pkg curl
# promtool (scripts/test checks the Prometheus alert rules with it).
command -v promtool >/dev/null || need_pkg prometheus
# systemd-analyze (tests/tests/systemd_units.rs scores the deploy/systemd units with it).
command -v systemd-analyze >/dev/null || need_pkg systemd
if [ "${#apt_missing[@]}" -gt 0 ]; then
  echo "==> apt-get install ${apt_missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

ANVIL_VERSION=1.7.1
if [ ! -x "$TOOLS/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil" ] || \
   [ ! -x "$TOOLS/node_modules/@foundry-rs/cast-linux-amd64/bin/cast" ]; then
  echo "==> npm install @foundry-rs/anvil@$ANVIL_VERSION @foundry-rs/cast@$ANVIL_VERSION"
  (cd "$TOOLS" && [ -f package.json ] || echo '{"private":true}' > "$TOOLS/package.json"
   cd "$TOOLS" && npm install --silent --no-audit --no-fund \
     "@foundry-rs/anvil@$ANVIL_VERSION" "@foundry-rs/cast@$ANVIL_VERSION" >/dev/null 2>&1)
fi

if [ ! -x "$TOOLS/venv/bin/python" ] || ! "$TOOLS/venv/bin/python" -c 'import eth_account' 2>/dev/null; then
  echo "==> pip install eth-account (independent checker)"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check 'eth-account==0.14.*'
fi

export CASTELLAN_ANVIL="$TOOLS/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
export CASTELLAN_CAST="$TOOLS/node_modules/@foundry-rs/cast-linux-amd64/bin/cast"
export CASTELLAN_PYTHON="$TOOLS/venv/bin/python"
export CASTELLAN_PKCS11_MODULE="${CASTELLAN_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
for f in "$CASTELLAN_ANVIL" "$CASTELLAN_CAST" "$CASTELLAN_PYTHON" "$CASTELLAN_PKCS11_MODULE"; do
  [ -e "$f" ] || { echo "missing after install: $f" >&2; exit 1; }
done
