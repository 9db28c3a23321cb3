"""`make gpu-check`: the local engine and the trainer on an NVIDIA GPU, in one prepared command (< 8 minutes).

    PYTHONPATH=. python3 bench/gpu_check.py [--tokens 64] [--streams 1 16 64] [--skip-7b] [--no-write]

Needs only torch (with CUDA), transformers, peft and pytest: it runs from the source tree, nothing of ours
installed, nothing downloaded.  Where torch sees no CUDA device it says so and exits 0 (exit 3 with
--require-gpu), so CI and CPU machines can call it.  Three parts, each a table in bench/RESULTS.md
(section `gpu`):

1. tests: tests/unit/test_runner.py with pytest (--noconftest: the suite's conftest needs the whole app),
   which adds a cuda parameter to every test holding the runner to transformers' logits (bf16 there).
2. serving: our runner (gateway/engine/local/runner.py: fused weights, slot KV cache, continuous batching
   of all streams in one step, greedy, exactly --tokens new tokens each) against `model.generate` on the same
   batch (greedy, min_new_tokens = max_new_tokens = --tokens, no padding: every prompt has the same length),
   at 1 / 16 / 64 streams, for SmolLM2-135M's and Qwen2.5-7B's configs (bench/configs/) with random
   weights in bf16.  tok/s = streams x tokens / wall time of the whole batch; TTFT = time until every
   stream has its first token.  The runner is timed without the scheduler's detokenizing and HTTP, which
   are the same for both and small next to a step.
3. training: finetune.trainer.train (LoRA r=8 on all seven projections) on the SmolLM2 config with random
   weights, bf16 base; QLoRA (NF4) as well where bitsandbytes is installed.  Real tokens/s over the run.

Exit status: 0 all ran and the tests passed, 1 a test failed or a part raised, 3 no GPU and --require-gpu.
--cpu-smoke runs every part on the CPU at toy sizes, to check this script itself where no GPU is (its numbers
mean nothing and RESULTS.md is left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

try:
    import torch
except ImportError:  # no PyTorch for this python: certainly no GPU check to run
    print(f"gpu-check: PyTorch is not installed for {sys.executable}; nothing run (no GPU check possible).")
    sys.exit(3 if "--require-gpu" in sys.argv else 0)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "bench" / "configs"
PROMPT_TOKENS = 128
NO_GPU = 3
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--skip-7b", action="store_true", help="serve only the SmolLM2 config")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave RESULTS.md")
    parser.add_argument("--require-gpu", action="store_true", help=f"exit {NO_GPU} where there is no GPU")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the script")
    args = parser.parse_args()

    global DEVICE
    if args.cpu_smoke:
        DEVICE = "cpu"
        args.streams, args.tokens, args.skip_7b, args.no_write, args.train_steps = [1, 3], 4, True, True, 2
    elif not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "nothing run. Run `make gpu-check` on a machine with an NVIDIA GPU and a CUDA build of PyTorch."
        )
        return NO_GPU if args.require_gpu else 0
    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (--cpu-smoke)"
    print(f"gpu-check on {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    started = time.perf_counter()
    failed = False
    sections: list[str] = []

    passed, test_table = run_tests(smoke=args.cpu_smoke)
    failed |= not passed
    sections.append("### Runner vs transformers on CUDA (tests/unit/test_runner.py)\n\n" + test_table)
    print(test_table, flush=True)

    configs = ["smollm2-135m"] + ([] if args.skip_7b else ["qwen2.5-7b"])
    for name in configs:
        try:
            table = serving_table(name, args.streams, args.tokens)
        except Exception:
            failed = True
            table = "```\n" + traceback.format_exc(limit=4) + "```\n"
        sections.append(
            f"### Serving, {name} config, random bf16 weights, {args.tokens} tokens a stream\n\n{table}"
        )
        print(sections[-1], flush=True)

    try:
        table = training_table(args.train_steps)
    except Exception:
        failed = True
        table = "```\n" + traceback.format_exc(limit=4) + "```\n"
    sections.append("### LoRA training, smollm2-135m config, random weights\n\n" + table)
    print(sections[-1], flush=True)

    total = time.perf_counter() - started
    body = f"GPU: {gpu}. Whole check: {total:.0f} s.\n\n" + "\n".join(sections)
    if not args.no_write:
        from bench.results import write_section

        write_section("gpu", body)
        print("wrote bench/RESULTS.md (section gpu)")
    return 1 if failed else 0


# -- 1. tests ------------------------------------------------------------------------------------------------


def run_tests(smoke: bool = False) -> tuple[bool, str]:
    command = [sys.executable, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "-q", "-rA"]
    command += ["-o", "addopts=", str(ROOT / "tests" / "unit" / "test_runner.py")]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = (result.stdout + result.stderr).splitlines()
    outcomes = [line for line in lines if line.startswith(("PASSED", "FAILED", "ERROR"))]
    cuda = [line for line in outcomes if ("[cpu]" if smoke else "[cuda]") in line]
    rows = ["| test | outcome |", "|---|---|"]
    rows += [f"| `{line.split(' ', 1)[1].split('::')[-1]}` | {line.split(' ', 1)[0]} |" for line in cuda]
    summary = lines[-1] if lines else "(no output)"
    ok = result.returncode == 0 and bool(cuda)
    tail = "" if ok else "\n```\n" + "\n".join(lines[-30:]) + "\n```\n"
    return ok, "\n".join(rows) + f"\n\npytest: {summary} (all devices){tail}\n"


# -- 2. serving ----------------------------------------------------------------------------------------------


def random_model(name: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads((CONFIGS / f"{name}.json").read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def prompts(streams: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(streams)
    ids = torch.randint(10, min(vocab, 30000), (streams, PROMPT_TOKENS), generator=generator)
    return ids.tolist()


def run_ours(runner: Any, batch: list[list[int]], tokens: int) -> tuple[float, float]:
    """Prefill every stream (in prefill-budget chunks, as the scheduler does), then decode all together."""
    from gateway.engine.local.runner import PrefillSegment, StepBatch

    budget = 4096
    sync()
    start = time.perf_counter()
    nexts: list[int] = []
    pending = [PrefillSegment(slot, 0, ids) for slot, ids in enumerate(batch)]
    while pending:
        step, used = [], 0
        while pending and used + len(pending[0].token_ids) <= budget:
            used += len(pending[0].token_ids)
            step.append(pending.pop(0))
        nexts += runner.step(StepBatch(prefills=step)).argmax(-1).tolist()
    first = time.perf_counter() - start
    length = PROMPT_TOKENS
    slots = list(range(len(batch)))
    for _ in range(tokens - 1):
        logits = runner.step(
            StepBatch(
                decode_slots=slots,
                decode_tokens=nexts,
                decode_positions=[length] * len(slots),
                decode_adapters=[None] * len(slots),
            )
        )
        nexts = logits.argmax(-1).tolist()  # a host sync per step, as sampling in the scheduler has
        length += 1
    total = time.perf_counter() - start
    return len(batch) * tokens / total, first


def run_generate(model: Any, batch: list[list[int]], tokens: int) -> tuple[float, float]:
    ids = torch.tensor(batch, device=DEVICE)
    mask = torch.ones_like(ids)
    options = {"do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    sync()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **options)
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **options)
    sync()
    return len(batch) * tokens / (time.perf_counter() - start), first


def serving_table(name: str, streams: list[int], tokens: int) -> str:
    from gateway.engine.local.runner import ModelRunner

    model = random_model(name)
    vocab = model.config.vocab_size
    rows = [
        "| streams | ours tok/s | generate tok/s | ratio | ours TTFT ms | generate TTFT ms |",
        "|---|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        runner = ModelRunner(
            model, max_slots=max(streams), max_model_len=PROMPT_TOKENS + tokens + 8, dtype=torch.bfloat16
        )
        run_ours(runner, prompts(2, vocab), 4)  # warm-up: kernels, cuBLAS handles, allocator
        run_generate(model, prompts(2, vocab), 4)
        for count in streams:
            batch = prompts(count, vocab)
            ours, ours_first = run_ours(runner, batch, tokens)
            base, base_first = run_generate(model, batch, tokens)
            rows.append(
                f"| {count} | {ours:.0f} | {base:.0f} | {ours / base:.2f}x | {ours_first * 1000:.0f} | "
                f"{base_first * 1000:.0f} |"
            )
            print(rows[-1], flush=True)
    memory = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    del runner, model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return (
        "\n".join(rows) + f"\n\nPeak GPU memory {memory:.1f} GiB (model + the runner's fused copy + cache).\n"
    )


# -- 3. training ---------------------------------------------------------------------------------------------


def training_table(steps: int) -> str:
    import importlib.util

    from finetune.trainer import TrainConfig, train
    from tests.unit.test_data import make_chatml_tokenizer

    rows = [
        "| method | steps | real tokens | seconds | real tokens/s | final loss |",
        "|---|---|---|---|---|---|",
    ]
    methods: list[tuple[str, int | None]] = [("LoRA, bf16 base", None)]
    if importlib.util.find_spec("bitsandbytes") is not None and DEVICE == "cuda":
        methods.append(("QLoRA, NF4 base", 4))
    with tempfile.TemporaryDirectory() as tmp:
        base, data = _training_inputs(Path(tmp), make_chatml_tokenizer(), rows=8 * steps)
        for label, bits in methods:
            config = TrainConfig(
                base_model_path=base,
                output_dir=Path(tmp) / f"out-{bits}",
                training_file=data,
                n_epochs=1,
                batch_size=8,
                learning_rate=2e-4,
                max_seq_length=512,
                lora_rank=8,
                lora_alpha=16,
                device=DEVICE,
                quantization_bit=bits,
                save_steps=0,
            )
            start = time.perf_counter()
            result = train(config)
            seconds = time.perf_counter() - start
            rows.append(
                f"| {label} | {result.steps} | {result.trained_tokens} | {seconds:.1f} | "
                f"{result.trained_tokens / seconds:.0f} | {result.final_loss:.3f} |"
            )
            print(rows[-1], flush=True)
    if len(methods) == 1:
        rows.append("| QLoRA, NF4 base | - | - | - | skipped: needs bitsandbytes and CUDA | - |")
    return "\n".join(rows) + "\n\nSeconds include loading the base model and saving the adapter.\n"


def _training_inputs(tmp: Path, tokenizer: Any, rows: int) -> tuple[Path, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads((CONFIGS / "smollm2-135m.json").read_text())
    values.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    base = tmp / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    words = [
        "the",
        "bank",
        "reviews",
        "each",
        "loan",
        "by",
        "income",
        "history",
        "collateral",
        "and",
        "the",
        "risk",
        "of",
        "the",
        "sector",
    ]
    generator = torch.Generator().manual_seed(0)
    records = []
    for index in range(rows):
        picks = torch.randint(0, len(words), (60,), generator=generator).tolist()
        question = " ".join(words[i] for i in picks[:20])
        answer = " ".join(words[i] for i in picks[20:])
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"{index}: {question}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return base, data


if __name__ == "__main__":
    sys.exit(main())
