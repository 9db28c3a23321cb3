#!/usr/bin/env bash
# Check the audit log's hash chain, then (with an admin token) read its first records over the API.
#
# The check runs on the gateway host with the service's own configuration (it reads the log and its key from
# the data dir), and is safe while the gateway is writing:
#   sudo -u privacy-gateway GATEWAY_CONFIG=/etc/privacy-gateway/gateway.toml examples/verify_audit.sh
# Development (data/ in the repository):
#   export GATEWAY_URL=https://127.0.0.1:8443 GATEWAY_CA=certs/ca.pem
#   export GATEWAY_TOKEN=$(.venv/bin/gateway token --sub auditor --scope admin)
#   examples/verify_audit.sh
#
# The `gateway` command is GATEWAY_BIN if set, else the repository's .venv/bin/gateway (what `make install`
# creates), else the one on PATH (an installed package).
# Exit status: 0 when the chain is intact, 1 when it was altered (the output names the first bad line), 2 when
# there is no gateway command.
set -euo pipefail
repo_venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/gateway"
if [[ -n "${GATEWAY_BIN:-}" ]]; then
  gateway=$GATEWAY_BIN
elif [[ -x "$repo_venv" ]]; then
  gateway=$repo_venv
elif command -v gateway >/dev/null; then
  gateway=gateway
else
  echo "verify_audit.sh: no gateway command: not at $repo_venv (run \`make install\`), not on PATH;" \
    "or set GATEWAY_BIN" >&2
  exit 2
fi

echo "== hash chain =="
"$gateway" audit verify

if [[ -n "${GATEWAY_URL:-}" && -n "${GATEWAY_TOKEN:-}" ]]; then
  echo "== the first records, over the API (GET /v1/audit needs the admin scope) =="
  curl --silent --show-error --fail-with-body --cacert "${GATEWAY_CA:?set GATEWAY_CA}" \
    -H "Authorization: Bearer $GATEWAY_TOKEN" "$GATEWAY_URL/v1/audit?limit=3"
  echo
fi
