"""A LocalEngine over a tiny random Llama that uses the real SmolLM2 tokenizer, for the engine's unit tests:
`request(...)` builds a chat request, `collect(engine, request)` runs it to the end.  The fixtures that make
the model and start engines are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from contracts.base_models import embedded_gguf
from gateway.engine.base import ChatMessage, GenerationRequest, SamplingParams
from gateway.engine.local.engine import LocalEngine
from tests.unit.tiny_models import tiny_llama_config

NAME = "tiny"


def make_tiny_model_dir(out: Path, *, max_position_embeddings: int = 512) -> Path:
    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer), max_position_embeddings=max_position_embeddings, eos_token_id=tokenizer.eos_token_id
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def request(text: str = "Hello there", **sampling: object) -> GenerationRequest:
    n = int(sampling.pop("n", 1))  # type: ignore[call-overload]
    return GenerationRequest(
        request_id="t",
        model=NAME,
        messages=(ChatMessage("user", text),),
        sampling=SamplingParams(**sampling),
        n=n,
    )  # type: ignore[arg-type]


async def collect(engine: LocalEngine, req: GenerationRequest) -> tuple[dict[int, str], dict[int, str], int]:
    stream = await engine.submit(req)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    tokens = 0
    async for delta in stream:
        texts[delta.index] = texts.get(delta.index, "") + delta.text
        tokens += delta.token_count
        if delta.finish_reason:
            finish[delta.index] = delta.finish_reason
    return texts, finish, tokens
