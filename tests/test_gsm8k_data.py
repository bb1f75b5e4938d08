"""GSM8K data loading, JSON-lines validation, shipped assets, tokenizer and prompts."""

import json
import logging

import datasets
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from gradflow.assets import ASSETS, asset_path
from gradflow.tasks.errors import DataError
from gradflow.tasks.gsm8k import load_gsm8k, load_jsonl_problems
from gradflow.tasks.prompts import (
    DEFAULT_INSTRUCTION,
    chat_prompt,
    load_tokenizer,
    plain_prompt,
)
from gradflow.tasks.rows import Problem
from gradflow.tasks.task import _bos_text, _eos_ids

GOOD = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(("split", "size"), [("train", 7473), ("test", 1319)])
def test_load_gsm8k_local_sizes(split, size):
    problems = load_gsm8k(split)
    assert len(problems) == size
    assert all(isinstance(p, Problem) for p in problems)
    assert all("####" in p.answer and p.question for p in problems)
    # Same content and order as an independent read of the shipped file with the json module.
    with asset_path("gsm8k", f"{split}.jsonl").open(encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert problems[0] == Problem(question=first["question"], answer=first["answer"])


def test_load_jsonl_problems_skips_blank_lines_and_extra_fields(tmp_path):
    extra = {**GOOD, "id": 3}
    path = _write(tmp_path / "ok.jsonl", [json.dumps(GOOD), "", "   ", json.dumps(extra)])
    assert load_jsonl_problems(path) == [Problem(**GOOD), Problem(**GOOD)]
    assert load_jsonl_problems(str(path)) == [Problem(**GOOD), Problem(**GOOD)]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": "q", "answer": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"question": "q"}', 'missing field "answer"'),
        ('{"answer": "#### 1"}', 'missing field "question"'),
        ('{"question": "q", "answer": 4}', 'field "answer" must be a string, got int'),
        ('{"question": null, "answer": "#### 1"}', 'field "question" must be a string'),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    # Line 2 is blank: line numbers count every line of the file.
    path = _write(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", bad_line, json.dumps(GOOD)])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: ") as info:
        load_jsonl_problems(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        load_jsonl_problems(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"no problems in .*empty\.jsonl"):
        load_jsonl_problems(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_jsonl_problems(tmp_path / "nothing.jsonl")


def test_load_gsm8k_path_and_argument_errors(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [json.dumps(GOOD)])
    assert load_gsm8k("test", path=str(path)) == [Problem(**GOOD)]
    with pytest.raises(ValueError, match="train, test"):
        load_gsm8k("validation")
    with pytest.raises(ValueError, match="local, hub"):
        load_gsm8k("train", source="s3")
    with pytest.raises(ValueError, match=r"\.jsonl"):
        load_gsm8k("train", path=str(tmp_path / "mine.json"))
    with pytest.raises(ValueError, match='source="local"'):
        load_gsm8k("train", source="hub", path=str(path))


def test_load_gsm8k_hub_failure_suggests_local(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match='no network.*source="local"'):
        load_gsm8k("test", source="hub")
    assert calls == [("openai/gsm8k", "main")]


def test_load_gsm8k_hub_converts_rows(monkeypatch):
    rows = datasets.Dataset.from_list([GOOD])
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, split: rows)
    assert load_gsm8k("train", source="hub") == [Problem(**GOOD)]


def test_assets_shipped_with_licences():
    for name in ["gsm8k/train.jsonl", "gsm8k/test.jsonl", "gsm8k/LICENSE", "gsm8k/README.md"]:
        assert asset_path(*name.split("/")).is_file()
    for name in ["LICENSE", "README.md", "vocab.json", "merges.txt", "tokenizer_config.json"]:
        assert asset_path("qwen2", name).is_file()
    assert asset_path("qwen2", "qwen2-1.5b-instruct.config.json").parent == ASSETS / "qwen2"
    assert "MIT License" in asset_path("gsm8k", "LICENSE").read_text()
    assert "Apache License" in asset_path("qwen2", "LICENSE").read_text()
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        asset_path("qwen2", "nope.txt")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_load_tokenizer_shipped(tokenizer):
    assert 151_000 < len(tokenizer) < 152_000
    assert tokenizer.padding_side == "left"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644


def test_load_tokenizer_paths(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gradflow.tasks.prompts"):
        fallback = load_tokenizer(str(tmp_path))
    assert len(fallback) == 151_646
    assert "shipped Qwen2 tokenizer" in caplog.text
    assert load_tokenizer(str(ASSETS / "qwen2")).padding_side == "left"
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_tokenizer(str(tmp_path / "no-such-dir"))


def test_chat_prompt(tokenizer):
    question = "Janet has 3 ducks. How many ducks?"
    prompt = chat_prompt(tokenizer, question)
    assert f"<|im_start|>user\n{question}\n{DEFAULT_INSTRUCTION}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "####" in DEFAULT_INSTRUCTION
    custom = chat_prompt(tokenizer, question, system="Be brief.", instruction="Answer.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert f"{question}\nAnswer.<|im_end|>" in custom


def test_chat_prompt_without_template_points_to_plain():
    bare = load_tokenizer(None)
    bare.chat_template = None
    with pytest.raises(ValueError, match='prompt.template = "plain"'):
        chat_prompt(bare, "q")
    assert plain_prompt("What is 2 + 2?", "Think.") == "What is 2 + 2?\nThink.\n"


def test_eos_ids_include_the_models_own_list(tokenizer, tmp_path):
    """What HF `generate` stops on (`generation_config.json`, else `config.json`) ends a
    completion too, besides the tokenizer's EOS and Qwen's turn ends."""
    base = set(_eos_ids(tokenizer, None))
    assert base == {151643, 151645}
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert set(_eos_ids(tokenizer, tmp_path)) == base | {7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [8, 151645]}))
    assert set(_eos_ids(tokenizer, tmp_path)) == base | {8}


def test_plain_prompts_start_with_bos_where_the_tokenizer_adds_one(tokenizer):
    """Plain prompts are encoded as `tokenizer(text)` would: with the BOS a Llama-3-style
    tokenizer puts first, and none for Qwen."""
    assert _bos_text(tokenizer) == ""
    words = Tokenizer(WordLevel({"<s>": 0, "<unk>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    words.pre_tokenizer = Whitespace()
    words.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", unk_token="<unk>")
    assert _bos_text(with_bos) == "<s>"
    text = _bos_text(with_bos) + "a b"
    assert (
        with_bos.encode(text, add_special_tokens=False) == with_bos("a b")["input_ids"] == [0, 2, 3]
    )
