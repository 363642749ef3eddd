#!/usr/bin/env bash
# Installs the system packages the test suite runs for real: a private mosquitto (MQTT tests), a private
# PostgreSQL (metadata tests), libubootenv-tool (fw_printenv/fw_setenv: interoperability of the u-boot
# environment adapter; on Debian 12 u-boot-tools does not ship them) and Debian's Chromium (the
# console's browser tests drive it through Playwright over its DevTools protocol: no chromedriver, and
# no browser of Playwright's own, whose download needs the network) and liblzma (the cloud's delta
# encoder presets LZMA2's dictionary through it; Debian installs it with the base system).
# Idempotent and quiet; run by `make test` (and so by .ci/run).
set -euo pipefail
missing=()
command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || missing+=(mosquitto)
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  missing+=(postgresql)
fi
command -v fw_printenv >/dev/null 2>&1 || missing+=(libubootenv-tool)
ldconfig -p 2>/dev/null | grep -q 'liblzma\.so\.5 ' || test -e /lib/x86_64-linux-gnu/liblzma.so.5 \
  || compgen -G '/usr/lib/*/liblzma.so.5' >/dev/null || missing+=(liblzma5)
test -x /usr/bin/chromium || command -v chromium >/dev/null 2>&1 || missing+=(chromium)
((${#missing[@]})) || exit 0
if [ "$(id -u)" -eq 0 ]; then
  sudo_cmd=()
elif command -v sudo >/dev/null 2>&1; then
  sudo_cmd=(sudo)
else
  echo "error: the tests need: ${missing[*]} (install them with your package manager, or run as root)" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
