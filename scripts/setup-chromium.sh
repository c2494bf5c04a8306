#!/usr/bin/env bash
# Headless Chromium for the audit console's browser tests (audit/tests/integration/console.rs),
# run by scripts/test.sh like scripts/test-postgres.sh: Debian's chromium and chromium-driver,
# and libnss3-tools (certutil, pk12util: the test imports an officer's PKCS#12 into an NSS
# database, as an officer does into a browser). Idempotent: quick when everything is there.
#
# It also installs a Chromium policy, /etc/chromium/policies/managed/tutela-console-tests.json,
# that lets Chromium present a client certificate to https://127.0.0.1 (any port) without asking:
# headless Chromium cannot answer the certificate prompt. Each test runs Chromium with its own
# HOME whose NSS database holds one certificate, so "any certificate" is that one. Only loopback
# is named: a browser of this machine still asks before presenting a certificate anywhere else.
set -euo pipefail

need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v pk12util >/dev/null || need+=(libnss3-tools)
if [ "${#need[@]}" -gt 0 ]; then
    echo "==> installing ${need[*]} (apt-get)" >&2
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

policy_dir=/etc/chromium/policies/managed
policy="$policy_dir/tutela-console-tests.json"
content='{
  "AutoSelectCertificateForUrls": ["{\"pattern\":\"https://127.0.0.1\",\"filter\":{}}"]
}'
if [ "$(cat "$policy" 2>/dev/null)" != "$content" ]; then
    echo "==> installing the Chromium policy $policy (client certificates on https://127.0.0.1)" >&2
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" mkdir -p "$policy_dir"
    printf '%s\n' "$content" | "${sudo[@]}" tee "$policy" >/dev/null
fi
