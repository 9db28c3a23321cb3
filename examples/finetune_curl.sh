#!/usr/bin/env bash
# Fine-tune with curl, OpenAI's API shape: upload Alpaca data, create a job, follow it to the end, chat with
# the fine-tuned model.
#
#   export GATEWAY_URL=https://127.0.0.1:8443
#   export GATEWAY_CA=certs/ca.pem
#   export GATEWAY_TOKEN=$(gateway token --sub you --org acme \
#       --scope "files:write files:read fine_tuning:write fine_tuning:read chat models:read")
#   examples/finetune_curl.sh [examples/data/alpaca_demo.json]
#
# The data file is Alpaca JSON ([{"instruction", "input", "output"}, ...]) or chat JSONL ({"messages": [...]}
# per line).  FT_MODEL picks the base model, FT_EPOCHS the epochs (default 3).  The job runs in the fine-tuning
# worker (started by `gateway serve`, or its own service); on a CPU the demo data takes a few minutes.
set -euo pipefail
: "${GATEWAY_URL:?set GATEWAY_URL, e.g. https://127.0.0.1:8443}"
: "${GATEWAY_CA:?set GATEWAY_CA to the CA certificate that signed the gateway certificate (dev: certs/ca.pem)}"
: "${GATEWAY_TOKEN:?set GATEWAY_TOKEN (see the scopes above)}"
data="${1:-$(dirname "$0")/data/alpaca_demo.json}"
model="${FT_MODEL:-smollm2-135m-instruct}"
epochs="${FT_EPOCHS:-3}"
deadline=$((SECONDS + ${FT_TIMEOUT:-3600}))

api() {  # api METHOD PATH [curl args...]: one authenticated call; on an HTTP error, the error body to stderr
  local method=$1 path=$2 out
  shift 2
  if ! out=$(curl --silent --show-error --fail-with-body --cacert "$GATEWAY_CA" -X "$method" \
    -H "Authorization: Bearer $GATEWAY_TOKEN" "$@" "$GATEWAY_URL/v1$path"); then
    echo "$method $path failed: $out" >&2
    return 1
  fi
  printf '%s\n' "$out"
}
field() {  # field NAME < json: one top-level field ("" when null; objects as JSON)
  python3 -c 'import json, sys
v = json.load(sys.stdin).get(sys.argv[1])
print("" if v is None else v if isinstance(v, (str, int)) else json.dumps(v))' "$1"
}

echo "== 1. upload the training data =="
file=$(api POST /files -F purpose=fine-tune -F "file=@$data")
echo "$file"
file_id=$(field id <<<"$file")

echo "== 2. create the job =="
job=$(api POST /fine_tuning/jobs -H "Content-Type: application/json" --data @- <<JSON
{
  "model": "$model",
  "training_file": "$file_id",
  "suffix": "demo",
  "hyperparameters": {"n_epochs": $epochs}
}
JSON
)
echo "$job"
job_id=$(field id <<<"$job")

echo "== 3. follow it: validating_files -> queued -> running -> succeeded =="
status=""
while :; do
  job=$(api GET "/fine_tuning/jobs/$job_id")
  now=$(field status <<<"$job")
  if [[ "$now" != "$status" ]]; then
    echo "$(date +%T) status: $now"
    status=$now
  fi
  case "$status" in
    succeeded) break ;;
    failed | cancelled)
      echo "the job ended $status: $(field error <<<"$job")" >&2
      api GET "/fine_tuning/jobs/$job_id/events?limit=5" >&2
      exit 1
      ;;
  esac
  if ((SECONDS > deadline)); then
    echo "still $status after ${FT_TIMEOUT:-3600}s; cancelling" >&2
    api POST "/fine_tuning/jobs/$job_id/cancel" >/dev/null
    exit 1
  fi
  sleep 3
done
echo "== the latest events (newest first) =="
api GET "/fine_tuning/jobs/$job_id/events?limit=3"
echo
fine_tuned=$(field fine_tuned_model <<<"$job")
echo "fine-tuned model: $fine_tuned"

echo "== 4. chat with it =="
api POST /chat/completions -H "Content-Type: application/json" --data @- <<JSON
{
  "model": "$fine_tuned",
  "messages": [{"role": "user", "content": "What is the capital of Italy?"}],
  "max_tokens": 32,
  "temperature": 0
}
JSON
echo
echo "FINE_TUNED_MODEL=$fine_tuned"
