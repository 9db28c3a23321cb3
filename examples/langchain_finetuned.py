"""LangChain's ChatOpenAI against the gateway, with a fine-tuned model (or any model id) passed in.

    export GATEWAY_URL=https://127.0.0.1:8443
    export GATEWAY_CA=certs/ca.pem
    export GATEWAY_TOKEN=$(.venv/bin/gateway token --sub you --org acme --scope "chat models:read")
    .venv/bin/python examples/langchain_finetuned.py "$FINE_TUNED_MODEL" "What extension is the Orbit Lab on?"

FINE_TUNED_MODEL is the `fine_tuned_model` of a succeeded job (finetune_curl.sh prints it last).  It belongs
to the tenant (`org`) that trained it, so the token must carry the same org.  Needs `langchain-openai` (in
`.venv`).
"""

from __future__ import annotations

import os
import ssl
import sys

import httpx
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: langchain_finetuned.py MODEL_ID [QUESTION]")
    model = sys.argv[1]
    question = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?"
    tls = ssl.create_default_context(cafile=os.environ["GATEWAY_CA"])
    llm = ChatOpenAI(
        model=model,
        base_url=os.environ["GATEWAY_URL"].rstrip("/") + "/v1",
        api_key=os.environ["GATEWAY_TOKEN"],  # type: ignore[arg-type]
        temperature=0,
        max_tokens=48,  # type: ignore[call-arg]
        http_client=httpx.Client(verify=tls, timeout=120),
        http_async_client=httpx.AsyncClient(verify=tls, timeout=120),
    )
    messages = [SystemMessage("You are a helpful assistant. Answer briefly."), HumanMessage(question)]
    reply = llm.invoke(messages)
    print(f"[{model}] {reply.content}")
    if reply.usage_metadata:
        print(
            f"tokens: {reply.usage_metadata['input_tokens']} in, {reply.usage_metadata['output_tokens']} out"
        )


if __name__ == "__main__":
    main()
