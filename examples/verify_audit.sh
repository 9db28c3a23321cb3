#!/usr/bin/env bash
# Check the audit log's hash chain, then (with an admin token) read its first records over the API.
#
# The check runs on the gateway host with the service's own configuration (it reads the log and its key from
# the data dir), and is safe while the gateway is writing:
#   sudo -u privacy-gateway GATEWAY_CONFIG=/etc/privacy-gateway/gateway.toml examples/verify_audit.sh
# Development (data/ in the repository):
#   export GATEWAY_URL=https://127.0.0.1:8443 GATEWAY_CA=certs/ca.pem
#   export GATEWAY_TOKEN=$(gateway token --sub auditor --scope admin)
#   examples/verify_audit.sh
#
# Exit status: 0 when the chain is intact, 1 when it was altered (the output names the first bad line).
set -euo pipefail
gateway="${GATEWAY_BIN:-gateway}"

echo "== hash chain =="
"$gateway" audit verify

if [[ -n "${GATEWAY_URL:-}" && -n "${GATEWAY_TOKEN:-}" ]]; then
  echo "== the first records, over the API (GET /v1/audit needs the admin scope) =="
  curl --silent --show-error --fail-with-body --cacert "${GATEWAY_CA:?set GATEWAY_CA}" \
    -H "Authorization: Bearer $GATEWAY_TOKEN" "$GATEWAY_URL/v1/audit?limit=3"
  echo
fi
