#!/usr/bin/env bash
# Install what nbdproxy needs on Debian 12: apt packages, then a venv in .venv that sees Debian's
# libnbd binding (python3-libnbd is not on PyPI), with nbdproxy in editable mode.
# Idempotent; `make run`, `make test` and `make bench` call it.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: tests/test_browser.py runs the page in contrib/web/ in it.
APT_PACKAGES="qemu-utils nbdkit python3-libnbd libnbd-bin python3-venv python3-dev gcc curl openssl chromium"
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $APT_PACKAGES 2>/dev/null \
          | awk '$NF != "installed" {print $1}'; \
          for p in $APT_PACKAGES; do dpkg-query -W "$p" >/dev/null 2>&1 || echo "$p"; done)
missing=$(echo $missing | tr ' ' '\n' | sort -u | tr '\n' ' ')
if [ -n "${missing// /}" ]; then
    echo "setup: installing apt packages: $missing"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi

# Debian's own python3 sees the nbd module; the venv inherits it through --system-site-packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import nbd" 2>/dev/null; then
    echo "setup: creating .venv"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.nbdproxy-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
    echo "setup: installing nbdproxy and its test tools into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e . -r requirements-dev.txt
    touch "$stamp"
fi
