"""Chat with the gateway through the official `openai` SDK: one answer, one streamed answer, the model list.

    export GATEWAY_URL=https://127.0.0.1:8443
    export GATEWAY_CA=certs/ca.pem
    export GATEWAY_TOKEN=$(.venv/bin/gateway token --sub you --scope "chat models:read")
    .venv/bin/python examples/chat_sdk.py "What is the capital of France?"

GATEWAY_MODEL picks the model (default: the embedded smollm2-135m-instruct).  Any OpenAI-compatible code works
the same way: only `base_url`, the API key (the token) and the CA to trust change.
"""

from __future__ import annotations

import os
import ssl
import sys

import openai


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"
    model = os.environ.get("GATEWAY_MODEL", "smollm2-135m-instruct")
    client = openai.OpenAI(
        base_url=os.environ["GATEWAY_URL"].rstrip("/") + "/v1",
        api_key=os.environ["GATEWAY_TOKEN"],
        # Trust exactly the CA that signed the gateway's certificate.
        http_client=openai.DefaultHttpxClient(
            verify=ssl.create_default_context(cafile=os.environ["GATEWAY_CA"])
        ),
    )

    print("models:", ", ".join(m.id for m in client.models.list()))

    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": question},
    ]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0)
    print("answer:", answer.choices[0].message.content)
    if answer.usage:
        print(f"tokens: {answer.usage.prompt_tokens} prompt + {answer.usage.completion_tokens} completion")

    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=48, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
