#!/usr/bin/env bash
# Chat with the gateway using nothing but curl: one complete answer, then the same question streamed.
#
#   export GATEWAY_URL=https://127.0.0.1:8443
#   export GATEWAY_CA=certs/ca.pem
#   export GATEWAY_TOKEN=$(.venv/bin/gateway token --sub you --scope "chat models:read")
#   examples/chat_curl.sh "What is the capital of France?"
#
# GATEWAY_MODEL picks the model (default: the embedded smollm2-135m-instruct).
set -euo pipefail
: "${GATEWAY_URL:?set GATEWAY_URL, e.g. https://127.0.0.1:8443}"
: "${GATEWAY_CA:?set GATEWAY_CA to the CA certificate that signed the gateway certificate (dev: certs/ca.pem)}"
: "${GATEWAY_TOKEN:?set GATEWAY_TOKEN (dev: .venv/bin/gateway token --sub you --scope \"chat models:read\")}"
model="${GATEWAY_MODEL:-smollm2-135m-instruct}"
question="${1:-What is the capital of France?}"
question="${question//\\/\\\\}"   # escape for JSON: backslashes, then double quotes
question="${question//\"/\\\"}"

request() {  # $1: true to stream
  cat <<JSON
{
  "model": "$model",
  "messages": [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "$question"}
  ],
  "max_tokens": 48,
  "temperature": 0,
  "stream": $1
}
JSON
}

echo "== one response (JSON) =="
curl --silent --show-error --fail-with-body --cacert "$GATEWAY_CA" \
  -H "Authorization: Bearer $GATEWAY_TOKEN" -H "Content-Type: application/json" \
  --data "$(request false)" "$GATEWAY_URL/v1/chat/completions"
echo

echo "== streamed (server-sent events: one 'data:' line per chunk, then [DONE]) =="
curl --silent --show-error --fail-with-body --no-buffer --cacert "$GATEWAY_CA" \
  -H "Authorization: Bearer $GATEWAY_TOKEN" -H "Content-Type: application/json" \
  --data "$(request true)" "$GATEWAY_URL/v1/chat/completions"
