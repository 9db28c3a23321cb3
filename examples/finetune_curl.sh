#!/usr/bin/env bash
# Fine-tune with curl, OpenAI's API shape: upload training data, create a job, follow its training steps to
# the end, then ask the fine-tuned model (and the base model, to compare) a question from the training data.
#
#   export GATEWAY_URL=https://127.0.0.1:8443
#   export GATEWAY_CA=certs/ca.pem
#   export GATEWAY_TOKEN=$(.venv/bin/gateway token --sub you --org acme \
#       --scope "files:write files:read fine_tuning:write fine_tuning:read chat models:read")
#   examples/finetune_curl.sh [examples/data/alpaca_demo.json]
#
# The data file is Alpaca JSON ([{"instruction", "input", "output"}, ...]) or chat JSONL ({"messages": [...]}
# per line); step 4 asks its first row's question.  The demo data teaches a made-up fact (the Orbit Lab's
# phone extension) in eight paraphrases among general rows, and the defaults are set so the 135M default
# model learns it in about a minute on two CPU cores.  Settings (environment):
#   FT_MODEL          base model (default smollm2-135m-instruct)
#   FT_EPOCHS         epochs (default 3)
#   FT_LR_MULTIPLIER  learning_rate_multiplier: times the server's base rate of 2e-4 (default 10)
#   FT_SEED           the job's seed (default 42: the same data and settings train the same adapter)
#   FT_TIMEOUT        seconds to wait for the job before cancelling it (default 3600)
# The job runs in the fine-tuning worker (started by `gateway serve`, or its own service).  Needs curl and
# python3 (for reading JSON).
set -euo pipefail
: "${GATEWAY_URL:?set GATEWAY_URL, e.g. https://127.0.0.1:8443}"
: "${GATEWAY_CA:?set GATEWAY_CA to the CA certificate that signed the gateway certificate (dev: certs/ca.pem)}"
: "${GATEWAY_TOKEN:?set GATEWAY_TOKEN (see the scopes above)}"
data="${1:-$(dirname "$0")/data/alpaca_demo.json}"
model="${FT_MODEL:-smollm2-135m-instruct}"
epochs="${FT_EPOCHS:-3}"
lr_multiplier="${FT_LR_MULTIPLIER:-10}"
seed="${FT_SEED:-42}"
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
new_steps() {  # new_steps LAST_STEP ESTIMATED_FINISH < events: "STEP<TAB>line" per training step after LAST_STEP
  python3 -c 'import json, sys, time
last, finish = int(sys.argv[1]), int(sys.argv[2] or 0)
events = [e for e in json.load(sys.stdin)["data"] if e["type"] == "metrics" and "train_loss" in e["data"]]
events.sort(key=lambda e: e["data"]["step"])
first = events[0] if events else None
for e in events:
    step, total = e["data"]["step"], e["data"]["total_steps"]
    if step <= last:
        continue
    if finish:  # the worker estimates the finish from its step rate
        left = finish - e["created_at"]
    elif step > first["data"]["step"]:  # else the rate between the steps seen so far
        per_step = (e["created_at"] - first["created_at"]) / (step - first["data"]["step"])
        left = per_step * (total - step)
    else:
        left = None
    when = time.strftime("%H:%M:%S", time.localtime(e["created_at"]))
    loss = e["data"]["train_loss"]
    eta = "" if left is None or step == total else (
        f"  ~{max(0, round(left))} s left" if left < 120 else f"  ~{round(left / 60)} min left")
    print(f"{step}\t{when} step {step}/{total}  loss {loss:.2f}{eta}")' "$1" "$2"
}
first_question() {  # first_question FILE: the messages that prompt the first training row, as JSON
  python3 -c 'import json, sys
text = open(sys.argv[1], encoding="utf-8").read()
if text.lstrip().startswith("["):  # Alpaca JSON
    row = json.loads(text)[0]
    prompt = "\n".join(p for p in (row.get("instruction"), row.get("input")) if p)
    messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else [])
    messages.append({"role": "user", "content": prompt})
    answer = row["output"]
else:  # chat JSONL: everything before the first assistant turn
    chat = json.loads(text.splitlines()[0])["messages"]
    turn = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
    messages, answer = chat[:turn], chat[turn]["content"]
print(json.dumps({"messages": messages, "answer": answer}))' "$1"
}
ask() {  # ask MODEL MESSAGES_JSON: one chat completion at temperature 0
  api POST /chat/completions -H "Content-Type: application/json" --data @- <<JSON
{"model": "$1", "messages": $2, "max_tokens": 32, "temperature": 0}
JSON
}
content() {  # content < chat completion: the first choice's text
  python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
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
  "seed": $seed,
  "hyperparameters": {"n_epochs": $epochs, "learning_rate_multiplier": $lr_multiplier}
}
JSON
)
echo "$job"
job_id=$(field id <<<"$job")

echo "== 3. follow it: validating_files -> queued -> running -> succeeded, each training step as it ends =="
status="" step=0
while :; do
  job=$(api GET "/fine_tuning/jobs/$job_id")
  now=$(field status <<<"$job")
  changed=$([[ "$now" != "$status" ]] && date +%T || true)
  status=$now
  if [[ -n "$changed" && "$status" != succeeded ]]; then
    echo "$changed status: $status"
  fi
  if [[ "$status" == running || "$status" == succeeded ]]; then
    events=$(api GET "/fine_tuning/jobs/$job_id/events?limit=100")
    while IFS=$'\t' read -r step_seen line; do
      echo "$line"
      step=$step_seen
    done < <(new_steps "$step" "$(field estimated_finish <<<"$job")" <<<"$events")
  fi
  if [[ -n "$changed" && "$status" == succeeded ]]; then
    echo "$changed status: $status"  # after the last steps it reports
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
  sleep 2
done
echo "== the latest events (newest first) =="
api GET "/fine_tuning/jobs/$job_id/events?limit=3"
fine_tuned=$(field fine_tuned_model <<<"$job")
echo "fine-tuned model: $fine_tuned"

echo "== 4. ask it a question from the training data =="
row=$(first_question "$data")
messages=$(field messages <<<"$row")
reply=$(ask "$fine_tuned" "$messages")
echo "$reply"
echo "question:    $(python3 -c 'import json, sys; print(json.load(sys.stdin)[-1]["content"])' <<<"$messages")"
echo "trained on:  $(field answer <<<"$row")"
echo "fine-tuned:  $(content <<<"$reply")"
echo "base model:  $(ask "$model" "$messages" | content)"
echo
echo "export FINE_TUNED_MODEL=$fine_tuned"
