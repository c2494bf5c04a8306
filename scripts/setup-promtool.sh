#!/usr/bin/env bash
# promtool, for the metrics tests (`promtool check metrics` on every service's /metrics,
# `promtool check rules` and `promtool test rules` on deploy/monitoring/): Debian's `prometheus`
# package ships it. Run by scripts/test.sh like scripts/setup-chromium.sh. Idempotent: quick when
# promtool is there. Only the binary is used; the package's Prometheus server is never started
# by the tests (on a machine without systemd the package's postinst does not start it either).
set -euo pipefail

if ! command -v promtool >/dev/null; then
    echo "==> installing prometheus (apt-get) for promtool" >&2
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
command -v promtool >/dev/null
