"""contracts.training_data: format detection, the first bad line named, assistant-only labels, packing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from contracts.training_data import DataError, Turn, load_conversations, validate_file
from finetune.batches import Batch, pack
from finetune.chat_template import IGNORE_INDEX, Example, tokenize

# SmolLM2-Instruct's own template: ChatML, with a default system prompt when the conversation has none.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "You are a helpful assistant. system user assistant tool",
    "hello world, how are you? I am fine, thanks. What is two plus two? It is four.",
    "分析客户风险等级 客户年龄35岁,年收入50万,有房贷 中等风险 低风险 高风险",
    "Answer briefly. The capital of France is Paris. Translate: bonjour means hello.",
]
SECRET = "ZEBRA-7731-SECRET"


def make_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with ChatML special tokens: real merges, built in a second."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_chatml_tokenizer()


def write_jsonl(path: Path, records: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": text} for role, text in turns], **extra}


GOOD_CHAT = chat(("user", "What is two plus two?"), ("assistant", "It is four."))
GOOD_ALPACA = {
    "instruction": "分析客户风险等级",
    "input": "客户年龄35岁,年收入50万,有房贷",
    "output": "中等风险",
}


# --- formats ------------------------------------------------------------------------------------------------


def test_detects_chat_jsonl(tmp_path: Path) -> None:
    stats = validate_file(write_jsonl(tmp_path / "t.jsonl", [GOOD_CHAT, "", GOOD_CHAT]), max_rows=10)
    assert (stats.format, stats.rows) == ("chat", 2)


def test_detects_alpaca_jsonl_and_json_array(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "a.jsonl", [GOOD_ALPACA] * 3)
    array = tmp_path / "a.json"
    array.write_text(json.dumps([GOOD_ALPACA] * 4, ensure_ascii=False, indent=2), encoding="utf-8")
    assert validate_file(jsonl, max_rows=10) == validate_file(jsonl, max_rows=3)
    assert (validate_file(jsonl, max_rows=10).format, validate_file(jsonl, max_rows=10).rows) == ("alpaca", 3)
    assert (validate_file(array, max_rows=10).format, validate_file(array, max_rows=10).rows) == ("alpaca", 4)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_CHAT).encode() + b"\n")
    assert validate_file(path, max_rows=1).rows == 1


# --- the first bad line, named, without its content ---------------------------------------------------------


def bad_message(role: str = "user", **fields: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": role, "content": SECRET, **fields}, {"role": "assistant", "content": SECRET}]
    }


BAD_RECORDS: list[tuple[str, Any, str]] = [
    ("not json", '{"messages": [' + SECRET, "not valid JSON"),
    ("record not an object", json.dumps([SECRET]), "must be a JSON object"),
    ("neither format", {"prompt": SECRET}, 'expected "messages"'),
    ("messages not a list", {"messages": SECRET}, '"messages" must be a list'),
    ("empty messages", {"messages": []}, '"messages" is empty'),
    ("message not an object", {"messages": [SECRET]}, "messages[0] must be an object"),
    ("unknown role", bad_message(role="wizard"), "messages[0].role must be one of"),
    ("content missing", {"messages": [{"role": "user"}]}, "messages[0].content is missing"),
    ("content wrong type", bad_message(content=7), "messages[0].content must be a string or a list"),
    (
        "bad content part",
        bad_message(content=[{"type": "image_url", "url": SECRET}]),
        "messages[0].content[0]",
    ),
    ("weight on a user", bad_message(weight=1), "messages[0].weight is only allowed on assistant"),
    (
        "weight not 0/1",
        {"messages": [{"role": "assistant", "content": SECRET, "weight": 2}]},
        "weight must be 0 or 1",
    ),
    (
        "tool calls",
        {"messages": [{"role": "assistant", "content": SECRET, "tool_calls": [{}]}]},
        "tool calls",
    ),
    ("no assistant turn", {"messages": [{"role": "user", "content": SECRET}]}, "no assistant message"),
    (
        "all weight 0",
        {"messages": [{"role": "assistant", "content": SECRET, "weight": 0}]},
        "no assistant message",
    ),
    (
        "empty reply",
        {"messages": [{"role": "user", "content": SECRET}, {"role": "assistant", "content": " "}]},
        "empty",
    ),
    ("missing output", {"instruction": SECRET}, 'missing "output"'),
    ("output not a string", {"instruction": SECRET, "output": [SECRET]}, '"output" must be a string'),
    ("empty prompt", {"instruction": "", "output": SECRET}, '"instruction" and "input" are both empty'),
    ("bad history", {"instruction": SECRET, "output": SECRET, "history": [[SECRET]]}, "history[0] must be"),
    ("mixed formats", GOOD_ALPACA, "alpaca record in a file that starts in chat format (line 1)"),
]


@pytest.mark.parametrize(("case", "record", "reason"), BAD_RECORDS, ids=[c for c, _, _ in BAD_RECORDS])
def test_bad_record_names_its_line_and_not_its_content(
    tmp_path: Path, case: str, record: Any, reason: str
) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD_CHAT, "", record, GOOD_CHAT])
    with pytest.raises(DataError) as caught:
        validate_file(path, max_rows=100)
    assert caught.value.line == 3
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"line 3: {caught.value.reason}")
    assert SECRET not in str(caught.value)
    with pytest.raises(DataError):  # loading applies the same rules
        load_conversations(path)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_CHAT).encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"^line 2: not UTF-8") as caught:
        validate_file(path, max_rows=10)
    assert caught.value.line == 2


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]", " [ ]\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no records"):
        validate_file(path, max_rows=10)


def test_too_many_rows_stops_at_the_first_extra_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD_CHAT, GOOD_CHAT, "", GOOD_CHAT, "not json at all"])
    with pytest.raises(DataError, match="more than 2 rows") as caught:
        validate_file(path, max_rows=2)
    assert caught.value.line == 4  # reported before the broken line after it is even read


def test_json_array_errors_name_record_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    records = [GOOD_ALPACA, GOOD_ALPACA, {"instruction": SECRET}]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        validate_file(path, max_rows=10)
    error = caught.value
    assert (error.record, error.reason) == (3, 'missing "output"')
    assert path.read_text().splitlines()[error.line - 1].strip() == "{"  # the line where record 3 opens
    assert str(error) == f'record 3 (line {error.line}): missing "output"'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[{"instruction": "a", "output": "b"} {"instruction": "a", "output": "b"}]', "expected ',' or ']'"),
        ('[{"instruction": "a", "output": "b"},\n', "not closed"),
        ('[{"instruction": "a", "output": "b"}] extra', "after the closing"),
        ('[{"instruction": "a", "output": "b"},\n {"instruction": ]', "not valid JSON"),
    ],
)
def test_broken_json_array(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(DataError, match=reason):
        validate_file(path, max_rows=10)


# --- normalising to conversations ---------------------------------------------------------------------------


def test_chat_records_become_turns(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "two plus "}, {"type": "text", "text": "two?"}],
            },
            {"role": "assistant", "content": "five", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "four"},
        ],
        "tools": [],  # other top-level keys of the OpenAI format are ignored
    }
    [conversation] = load_conversations(write_jsonl(tmp_path / "t.jsonl", [record]))
    assert conversation == [
        Turn("system", "Be brief.", False),
        Turn("user", "two plus two?", False),
        Turn("assistant", "five", False),
        Turn("user", "again", False),
        Turn("assistant", "four", True),
    ]


def test_alpaca_records_become_turns(tmp_path: Path) -> None:
    record = {
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
        "system": "You translate.",
        "history": [["hi", "hello there"]],
    }
    [conversation] = load_conversations(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert conversation == [
        Turn("system", "You translate.", False),
        Turn("user", "hi", False),
        Turn("assistant", "hello there", True),
        Turn("user", "Translate\nbonjour", False),
        Turn("assistant", "hello", True),
    ]


# --- tokens and labels --------------------------------------------------------------------------------------


def learned_text(example: Example, tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """The learned spans, decoded one contiguous run at a time."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        learned = label != IGNORE_INDEX
        if learned:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = learned
    return [tokenizer.decode(run) for run in runs]


def test_only_trainable_assistant_turns_and_their_end_token_are_learned(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    conversation = [
        Turn("system", "You are a helpful assistant.", False),
        Turn("user", "What is two plus two?", False),
        Turn("assistant", "It is five.", False),  # weight 0
        Turn("user", "Again?", False),
        Turn("assistant", "It is four.\n", True),
        Turn("user", "Thanks", False),
        Turn("assistant", "中等风险", True),
    ]
    [example] = tokenize([conversation], tokenizer, max_seq_length=1024)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.text} for t in conversation], tokenize=False
    )
    # The reply and <|im_end|>: not the role header, not the newline the template adds after the end token.
    assert learned_text(example, tokenizer) == ["It is four.\n<|im_end|>", "中等风险<|im_end|>"]
    assert example.trainable_tokens == sum(label != IGNORE_INDEX for label in example.labels)


def test_default_system_prompt_of_the_template_is_not_learned(tokenizer: PreTrainedTokenizerFast) -> None:
    [example] = tokenize([[Turn("user", "hello", False), Turn("assistant", "hi", True)]], tokenizer, 1024)
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant")
    assert learned_text(example, tokenizer) == ["hi<|im_end|>"]


def test_truncation_and_dropping(tokenizer: PreTrainedTokenizerFast) -> None:
    short = [Turn("user", "hello", False), Turn("assistant", "It is four.", True)]
    long_prompt = [Turn("user", "hello world " * 50, False), Turn("assistant", "four", True)]
    [full] = tokenize([short], tokenizer, 1024)
    examples = tokenize([short, long_prompt], tokenizer, max_seq_length=len(full.input_ids) - 2)
    assert len(examples) == 1  # the long prompt leaves no reply token within the limit
    assert examples[0].input_ids == full.input_ids[:-2]
    assert learned_text(examples[0], tokenizer) == ["It is four."]


def test_an_opening_assistant_turn_is_context_only(tokenizer: PreTrainedTokenizerFast) -> None:
    greeting = [
        Turn("assistant", "hello there", True),
        Turn("user", "hi", False),
        Turn("assistant", "four", True),
    ]
    [example] = tokenize([greeting], tokenizer, 1024)
    assert learned_text(example, tokenizer) == ["four<|im_end|>"]
    assert tokenize([greeting[:1]], tokenizer, 1024) == []  # nothing left to learn: dropped


def test_a_conversation_the_template_refuses_is_dropped(tokenizer: PreTrainedTokenizerFast) -> None:
    strict = make_chatml_tokenizer()
    strict.chat_template = (
        "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no') }}{% endif %}" + CHATML
    )
    refused = [Turn("tool", "42", False), Turn("assistant", "four", True)]
    good = [Turn("user", "hi", False), Turn("assistant", "four", True)]
    assert tokenize([refused, good], strict, 1024) == tokenize([good], tokenizer, 1024)


# --- packing ------------------------------------------------------------------------------------------------


def example(tokens: list[int], learned_from: int, learned_to: int) -> Example:
    """Labels learned on positions [learned_from, learned_to), like a reply and its end-of-turn token."""
    labels = [t if learned_from <= i < learned_to else IGNORE_INDEX for i, t in enumerate(tokens)]
    return Example(tokens, labels)


def distinct_examples(*lengths: int) -> list[Example]:
    """No shared prefix; the reply is the second half but for the last token (formatting, not learned)."""
    return [example(list(range(100 * i, 100 * i + n)), n // 2, n - 1) for i, n in enumerate(lengths)]


def segments(batch: Batch) -> list[tuple[list[int], list[int], list[int]]]:
    """(input_ids, targets, position_ids) of each example, the shared prefix put back in front."""
    prefix = batch.shared_prefix
    ids, targets, positions = batch.input_ids, batch.targets, batch.position_ids
    found = []
    for start, end in zip(batch.boundaries, batch.boundaries[1:], strict=False):
        if prefix and start == 0:
            continue
        found.append(
            (
                ids[:prefix] + ids[start:end],
                targets[:prefix] + targets[start:end],
                positions[:prefix] + positions[start:end],
            )
        )
    return found


def test_pack_lays_examples_end_to_end_with_restarting_positions() -> None:
    examples = distinct_examples(5, 3, 4, 2, 6)
    batches = pack(examples, max_tokens_per_batch=9, seed=0)
    seen = []
    for batch in batches:
        assert batch.shared_prefix == 0
        assert batch.example_tokens <= 9
        assert len(batch.input_ids) == len(batch.targets) == len(batch.position_ids) == batch.boundaries[-1]
        for ids, targets, positions in segments(batch):
            [source] = [e for e in examples if e.input_ids[: len(ids)] == ids]
            # Cut after the input that predicts the last learned token; each input predicts the next label.
            last = max(i for i, label in enumerate(source.labels) if label != IGNORE_INDEX)
            assert len(ids) == last == len(source.input_ids) - 2
            assert targets == source.labels[1 : last + 1]
            assert positions == list(range(len(ids)))
            seen.append(source)
    learnable = [e for e in examples if e.trainable_tokens]  # the 2-token one has nothing to learn: skipped
    assert len(learnable) == 4
    assert sorted(e.input_ids for e in seen) == sorted(e.input_ids for e in learnable)  # each exactly once
    assert sum(b.trainable_tokens for b in batches) == sum(e.trainable_tokens for e in examples)
    assert sum(b.example_tokens for b in batches) == sum(len(e.input_ids) for e in learnable)


def test_pack_lays_a_shared_prompt_prefix_down_once() -> None:
    prompt = [7, 8, 9, 10, 11]
    examples = [
        example([*prompt, 20, 21, 22, 2, 1], 5, 9),  # learned from position 5: the prefix stops before it
        example([*prompt, 30, 31, 2, 1], 6, 8),
        example([7, 8, 9, 10, 11, 12, 40, 2, 1], 7, 8),  # shares one more prompt token with no one
    ]
    [batch] = pack(examples, max_tokens_per_batch=100, seed=0)
    assert batch.shared_prefix == 4  # position 4 predicts the first example's first reply token: not shared
    assert batch.input_ids[:4] == prompt[:4]
    assert batch.examples == 3
    rebuilt = segments(batch)
    for source in examples:
        end = max(i for i, label in enumerate(source.labels) if label != IGNORE_INDEX)
        assert (source.input_ids[:end], source.labels[1 : end + 1], list(range(end))) in rebuilt
    assert batch.tokens == 4 + sum(end - 4 for end in (8, 7, 7))
    assert batch.example_tokens == 10 + 9 + 9
    assert pack(examples, 100, seed=0, share_prefix=False)[0].shared_prefix == 0
    assert pack(examples[:1], 100, seed=0)[0].shared_prefix == 0  # nothing to share with


def test_pack_is_seeded_and_respects_the_example_limit() -> None:
    examples = distinct_examples(*range(3, 23))
    first = pack(examples, 10_000, seed=1, max_examples_per_batch=3)
    assert first == pack(examples, 10_000, seed=1, max_examples_per_batch=3)
    assert first != pack(examples, 10_000, seed=2, max_examples_per_batch=3)
    assert [b.examples for b in first] == [3] * 6 + [2]


def test_pack_refuses_an_example_longer_than_a_batch() -> None:
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        pack(distinct_examples(4, 12), max_tokens_per_batch=10, seed=0)
