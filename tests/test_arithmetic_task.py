"""The embedded arithmetic task and its character-level tokenizer."""

import json
import re

import pytest
import transformers

from gradflow.tasks.arithmetic import (
    ArithmeticTask,
    generate,
    question_split,
    solve,
    task_prompt,
)
from gradflow.tasks.tokenizer import CHARACTERS, build_tokenizer, save_tokenizer

STEP = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")
FINAL = re.compile(r"#### (-?\d+)")
QUESTION = re.compile(r"\d+([+-]\d+)+=\?")
CAP = 48


def _check_worked(question, answer):
    """Recompute the worked chain line by line; return the `####` number."""
    *steps, final = answer.split("\n")
    assert steps, answer
    running = None
    rebuilt = ""
    for line in steps:
        match = STEP.fullmatch(line)
        assert match, line
        left, operator, right, result = match.groups()
        left, right, result = int(left), int(right), int(result)
        if running is None:
            rebuilt = str(left)
        else:
            assert left == running, (line, running)
        expected = left + right if operator == "+" else left - right
        assert result == expected, line
        rebuilt += f"{operator}{right}"
        running = result
    assert rebuilt + "=?" == question
    match = FINAL.fullmatch(final)
    assert match, final
    assert int(match.group(1)) == running
    return running


def test_answers_correct():
    problems = generate(ArithmeticTask(), 500, seed=0, split="train")
    assert len(problems) == 500
    counts = set()
    for problem in problems:
        assert QUESTION.fullmatch(problem.question), problem.question
        number = _check_worked(problem.question, problem.answer)
        assert number == solve(problem.question)
        assert number >= 0
        assert all(0 <= int(x) <= 99 for x in re.findall(r"\d+", problem.question))
        counts.add(problem.question.count("+") + problem.question.count("-") + 1)
    assert counts == {2, 3}


def test_knobs():
    negative = generate(ArithmeticTask(allow_negative=True), 300, seed=1, split="train")
    assert any(solve(p.question) < 0 for p in negative)
    for problem in negative:
        assert _check_worked(problem.question, problem.answer) == solve(problem.question)
    plus = generate(
        ArithmeticTask(num_operands=(4, 4), max_value=9, operators="+"), 100, seed=1, split="test"
    )
    for problem in plus:
        assert "-" not in problem.question
        assert problem.question.count("+") == 3
        assert all(int(x) <= 9 for x in re.findall(r"\d+", problem.question))
        assert _check_worked(problem.question, problem.answer) == solve(problem.question)
    short = generate(ArithmeticTask(max_chars=28), 50, seed=1, split="train")
    assert all(len(task_prompt(p.question)) + len(p.answer) <= 28 for p in short)


def test_solve():
    assert solve("41+17-25=?") == 33
    assert solve("5-9+0=?") == -4
    assert solve(" 99+99+99=?\n") == 297
    for bad in ["1+=?", "+1=?", "2*3=?", "1+2", "1 + 2=?", "=?"]:
        with pytest.raises(ValueError):
            solve(bad)


def test_invalid_task():
    with pytest.raises(ValueError):
        ArithmeticTask(num_operands=(1, 2))
    with pytest.raises(ValueError):
        ArithmeticTask(num_operands=(3, 2))
    with pytest.raises(ValueError):
        ArithmeticTask(operators="*")
    with pytest.raises(ValueError):
        ArithmeticTask(max_value=0)
    tiny = ArithmeticTask(num_operands=(2, 2), max_value=3, operators="+")  # 16 questions in all
    with pytest.raises(ValueError):
        generate(tiny, 20, seed=0, split="test")


def test_splits_disjoint_deterministic_and_short():
    task = ArithmeticTask()
    train = generate(task, 2000, seed=0, split="train")
    test = generate(task, 500, seed=0, split="test")
    train_questions = {p.question for p in train}
    test_questions = {p.question for p in test}
    assert len(train_questions) == 2000
    assert len(test_questions) == 500
    assert not train_questions & test_questions
    assert all(question_split(q) == "train" for q in train_questions)
    assert all(question_split(q) == "test" for q in test_questions)
    # A different seed draws other questions, still on the same side of the split.
    other_test = generate(task, 500, seed=1, split="test")
    assert other_test != test
    assert not train_questions & {p.question for p in other_test}

    assert generate(task, 500, seed=0, split="test") == test
    assert generate(task, 100, seed=0, split="train") == train[:100]

    for problem in train + test:
        assert len(task_prompt(problem.question)) + len(problem.answer) < CAP


def test_tokenizer_round_trip(tmp_path):
    save_tokenizer(tmp_path)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "<eos>"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    built = build_tokenizer()

    assert tokenizer.pad_token_id == 0
    assert tokenizer.eos_token_id not in (tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == len(built) == 3 + len(CHARACTERS) < 64

    problems = generate(ArithmeticTask(allow_negative=True), 200, seed=3, split="test")
    texts = [task_prompt(p.question) + p.answer for p in problems]
    texts.append(CHARACTERS + "  \n\n #")
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == built(text)["input_ids"]
        assert len(ids) == len(text)  # one token per character, nothing added
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        with_eos = tokenizer(text + tokenizer.eos_token)["input_ids"]
        assert with_eos == [*ids, tokenizer.eos_token_id]
        assert tokenizer.decode(with_eos, skip_special_tokens=True) == text

    batch = tokenizer(texts[:4], padding=True)
    width = max(len(t) for t in texts[:4])
    for text, ids, mask in zip(texts[:4], batch["input_ids"], batch["attention_mask"], strict=True):
        pad = width - len(text)
        assert ids[:pad] == [0] * pad and mask[:pad] == [0] * pad
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
