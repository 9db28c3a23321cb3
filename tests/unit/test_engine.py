"""The scheduler: continuous batching, aborts, back-pressure, n, seeds, stops — on a tiny random model that
uses the real SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from gateway.core.errors import ContextLengthExceeded, EngineUnavailable, NotFound, RateLimited
from gateway.engine.base import ChatMessage, GenerationRequest, SamplingParams
from gateway.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from gateway.engine.local.engine import LocalEngine
from gateway.engine.local.lora import AdapterError
from gateway.engine.local.sampling import SequenceSampler, sample_batch
from tests.unit.tiny_engine import NAME, collect, request
from tests.unit.tiny_models import save_peft_adapter


def test_greedy_length_and_usage(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    texts, finish, tokens = asyncio.run(
        collect(engine, request(max_tokens=12, temperature=0, ignore_eos=True))
    )
    assert finish == {0: "length"} and tokens == 12 and texts[0]


def test_a_new_request_joins_the_running_batch(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()

    async def scenario() -> tuple[float, float]:
        long_stream = await engine.submit(request("long", max_tokens=120, temperature=0, ignore_eos=True))
        seen = 0
        long_done = 0.0
        short_first = 0.0
        running = asyncio.Event()

        async def run_long() -> None:
            nonlocal seen, long_done
            async for _ in long_stream:
                seen += 1
                if seen == 5:
                    running.set()
            long_done = time.perf_counter()

        task = asyncio.create_task(run_long())
        await running.wait()
        assert engine.stats().running == 1
        short = await engine.submit(request("short", max_tokens=3, temperature=0, ignore_eos=True))
        async for _ in short:
            if not short_first:
                short_first = time.perf_counter()
        await task
        return short_first, long_done

    short_first, long_done = asyncio.run(scenario())
    assert short_first < long_done  # it did not wait for the running request to finish


def test_abort_frees_the_slot_within_a_step(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()

    async def scenario() -> None:
        stream = await engine.submit(request(max_tokens=200, temperature=0, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if engine.stats().running == 0:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("slot not freed")

    asyncio.run(scenario())


def test_queue_full_is_rate_limited(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory(max_running=1, max_queued=1)
    long = {"max_tokens": 220, "temperature": 0, "ignore_eos": True}

    async def scenario() -> None:
        streams = [await engine.submit(request(**long))]
        async for _ in streams[0]:
            break  # now running
        # one running + one queued is full; a loaded machine may finish a stream between two submits
        # (tokenizing runs on a thread), so keep submitting long ones until the full queue refuses one
        with pytest.raises(RateLimited) as info:
            for _ in range(6):
                streams.append(await engine.submit(request(**long)))
        assert len(streams) <= 4  # refused at once, or after at most a couple of streams finished
        assert info.value.headers["Retry-After"] == "1"
        for stream in streams:
            await stream.aclose()

    asyncio.run(scenario())


def test_seeded_sampling_is_reproducible_and_n_differs(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    params = {"max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 2, "ignore_eos": True}
    first = asyncio.run(collect(engine, request(**params)))[0]
    second = asyncio.run(collect(engine, request(**params)))[0]
    assert first == second and set(first) == {0, 1}
    assert first[0] != first[1]


def test_a_seed_at_the_top_of_int64_with_n_does_not_overflow(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    for seed in (2**63 - 1, -(2**63), 2**64 - 1):  # seed + index past what torch's manual_seed takes
        params = {"max_tokens": 3, "temperature": 1.0, "seed": seed, "n": 3, "ignore_eos": True}
        texts, finish, _ = asyncio.run(collect(engine, request(**params)))
        assert set(texts) == {0, 1, 2} and set(finish.values()) == {"length"}


def test_greedy_output_does_not_depend_on_batch_company(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    alone = asyncio.run(collect(engine, request("alpha", max_tokens=16, temperature=0, ignore_eos=True)))[0]

    async def together() -> list[dict[int, str]]:
        results = await asyncio.gather(
            *(
                collect(engine, request(t, max_tokens=16, temperature=0, ignore_eos=True))
                for t in ("alpha", "beta", "gamma delta", "e")
            )
        )
        return [r[0] for r in results]

    assert asyncio.run(together())[0] == alone


def test_context_and_adapter_errors(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(collect(engine, request("word " * 300)))
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(collect(engine, request(max_tokens=255)))
    missing = GenerationRequest(request_id="t", model=NAME, prompt="x", adapter="nope")
    with pytest.raises(NotFound):
        asyncio.run(collect(engine, missing))


def test_the_model_and_adapters_load_on_the_engine_thread(  # type: ignore[no-untyped-def]
    engine_factory, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All torch work of the serving process stays on one thread (LocalEngine._run says why)."""
    import contracts.base_models
    from gateway.engine.local import engine as local

    loaded_on: list[str] = []

    def spy(real):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            loaded_on.append(threading.current_thread().name)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(contracts.base_models, "load_model", spy(contracts.base_models.load_model))
    monkeypatch.setattr(local.LoraAdapter, "load", spy(local.LoraAdapter.load))
    prepare = spy(
        lambda: tiny_model_dir
    )  # as build_engine passes contracts.base_models.prepare (a GGUF converts)
    engine = engine_factory(model_dir=prepare)
    assert engine.model_dir == tiny_model_dir
    save_peft_adapter(LlamaForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter", seed=1)
    engine.add_adapter("ft", tmp_path / "adapter")
    assert loaded_on == ["engine", "engine", "engine"]
    tuned = GenerationRequest(
        request_id="t", model=NAME, prompt="Hello", adapter="ft", sampling=SamplingParams(max_tokens=4)
    )
    assert asyncio.run(collect(engine, tuned))[1] == {0: "length"}


def test_a_bad_adapter_fails_its_caller_and_the_engine_serves_on(  # type: ignore[no-untyped-def]
    engine_factory, tmp_path: Path
) -> None:
    engine = engine_factory()
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="missing"):
        engine.add_adapter("broken", tmp_path / "empty")
    assert not engine.has_adapter("broken")
    assert asyncio.run(collect(engine, request(max_tokens=3)))[2] == 3
    engine.shutdown()
    with pytest.raises(EngineUnavailable):
        engine.add_adapter("late", tmp_path / "empty")


def test_a_model_that_does_not_load_fails_start(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    engine = LocalEngine(NAME, tmp_path / "model", dtype="float32")
    with pytest.raises((OSError, ValueError)):  # raised on the engine thread, re-raised here
        engine.start()
    assert not engine.is_ready()


def test_stop_matcher_holds_back_partial_matches() -> None:
    stops = StopMatcher(("STOP", "end."))
    assert stops.feed("hello ST") == ("hello ", False)
    assert stops.feed("OR") == ("STOR", False)
    assert stops.feed(" the en") == (" the ", False)
    assert stops.feed("d. more") == ("", True)
    assert StopMatcher(()).feed("anything") == ("anything", False)
    tail = StopMatcher(("xyz",))
    assert tail.feed("abx") == ("ab", False) and tail.flush() == "x"


def test_incremental_detokenizer_rebuilds_the_text(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = "Grüße aus Zürich — 你好, naïve café!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) == text


def test_sampling_penalties_top_p_and_logprobs() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    greedy = SequenceSampler(SamplingParams(temperature=0, logprobs=True, top_logprobs=2))
    result = sample_batch(logits, [greedy])
    assert result.token_ids == [1] and result.top is not None and [t for t, _ in result.top[0]] == [1, 2]
    penalised = SequenceSampler(SamplingParams(temperature=0, frequency_penalty=2.0))
    penalised.generated = [1]
    assert sample_batch(logits, [penalised]).token_ids == [2]
    narrow = SequenceSampler(SamplingParams(temperature=1.0, top_p=0.01, seed=3))
    assert {sample_batch(logits, [narrow]).token_ids[0] for _ in range(20)} == {1}


def test_a_prompt_that_cannot_fit_is_refused_before_the_tokenizer_runs(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    longest = engine._max_chars_per_token
    assert 8 <= longest < 1000  # read from the real SmolLM2 vocabulary
    calls: list[int] = []
    real = engine.tokenize

    def counting(req: GenerationRequest) -> list[int]:
        calls.append(threading.get_ident())
        return real(req)

    engine.tokenize = counting
    many = GenerationRequest(
        request_id="t",
        model=NAME,
        messages=tuple(ChatMessage("user", "x") for _ in range(engine.max_model_len + 1)),
        sampling=SamplingParams(max_tokens=1),
    )
    with pytest.raises(ContextLengthExceeded, match="messages"):
        asyncio.run(collect(engine, many))
    with pytest.raises(ContextLengthExceeded, match="characters"):
        asyncio.run(collect(engine, request("x" * (engine.max_model_len * longest + 1), max_tokens=1)))
    assert calls == []  # neither reached the tokenizer
    asyncio.run(collect(engine, request(max_tokens=1)))
    assert len(calls) == 1 and calls[0] != threading.get_ident()  # tokenized off the caller's thread
