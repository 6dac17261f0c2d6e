#!/usr/bin/env bash
# Headless Chromium for the browser tests of /docs and /redoc (tests/test_docs_browser.py):
# installs Debian's `chromium` package when /usr/bin/chromium is missing. Installing needs root;
# when Chromium is already there this does nothing and prints nothing.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x $CHROMIUM ]]; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "ensure_chromium.sh: $CHROMIUM is missing, and installing it needs root:" \
        "run this script as root, or 'apt-get install chromium' (Debian)." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "ensure_chromium.sh: $CHROMIUM is missing and there is no apt-get to install it" \
        "(Debian's chromium package is expected)." >&2
    exit 1
fi

echo "ensure_chromium.sh: installing Debian's chromium package" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh image has no package lists yet.
apt-get update -qq
apt-get install -y -qq chromium >/dev/null

if [[ ! -x $CHROMIUM ]]; then
    echo "ensure_chromium.sh: the chromium package is installed but $CHROMIUM is not there" >&2
    exit 1
fi
