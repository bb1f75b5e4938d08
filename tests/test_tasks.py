"""Your own task: dataset files, reward functions under TRL's and verl's calling conventions,
math grading, the worker pool, and every bad input the issue lists."""

import json
import re
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from child_run import MODEL_OVERRIDES, tiny_config, tokenizer_dir

from gradflow.config import ConfigError, build_config, load_config
from gradflow.rewards import boxed_format, gsm8k_strict, math_verify, think_format
from gradflow.tasks.errors import DataError
from gradflow.tasks.files import read_rows
from gradflow.tasks.reward_functions import RewardFunction, RewardFunctionError, from_spec
from gradflow.tasks.scoring import Scorer
from gradflow.tasks.task import build_task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
from run import main  # noqa: E402

ROWS = [
    {"prompt": "12+30=?\n", "solution": "42", "level": 1},
    {"prompt": "50-8=?\n", "solution": "42", "level": 2},
    {"prompt": "1+1=?\n", "solution": "2", "level": 1},
]

REWARDS = """
def exact(prompts, completions, completion_ids, solution, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(t.strip().endswith(s)) for t, s in zip(texts, solution)]

def by_level(prompts, completions, completion_ids, level, **kwargs):
    return [None if lv == 2 else float(len(ids)) for lv, ids in zip(level, completion_ids)]

def raises_on_boom(prompts, completions, **kwargs):
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    return [1.0] * len(completions)

def hangs_on_hang(prompts, completions, **kwargs):
    import time
    if any("hang" in c for c in completions):
        time.sleep(120)
    return [1.0] * len(completions)

def nan_on_nan(prompts, completions, **kwargs):
    return [float("nan") if "nan" in c else 0.5 for c in completions]

def too_few(prompts, completions, **kwargs):
    return [1.0]

def words(prompts, completions, **kwargs):
    return ["yes"] * len(completions)

# verl's compute_score for its GSM8K file: the number after the last `#### `.
def verl_gsm8k(data_source, solution_str, ground_truth, extra_info=None):
    assert data_source == "openai/gsm8k" and set(extra_info) == {"split", "index", "answer", "question"}
    found = solution_str.rpartition("#### ")[2].strip() if "#### " in solution_str else None
    return {"score": float(found == ground_truth), "acc": found == ground_truth}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tasks")
    (path / "rewards.py").write_text(REWARDS)
    with open(path / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in ROWS)
    return path


def _raw(root: Path, **task) -> dict:
    return {
        "model": {"path": "gradflow:toy-arith"},
        "task": {
            "name": "dataset",
            "train": str(root / "train.jsonl"),
            "test": str(root / "train.jsonl"),
            "answer_key": "solution",
            "reward_workers": 0,
            **task,
        },
        "reward": [{"function": f"{root}/rewards.py:exact"}],
        "algorithm": {"name": "grpo"},
    }


# Math grading against answers checked by hand: (reference, completion, equal).
MATH_TABLE = [
    (r"\frac{1}{2}", r"The answer is \boxed{0.5}", 1.0),
    (r"0.5", r"\boxed{\frac{1}{2}}", 1.0),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\sqrt{2}/2}", 1.0),
    (r"\boxed{3}", r"so we get \boxed{3}", 1.0),
    (r"2", r"\boxed{2.0}", 1.0),
    (r"\frac{3}{4}", r"\boxed{0.75}", 1.0),
    (r"(1, 2)", r"\boxed{(1,2)}", 1.0),
    (r"[0, 1]", r"\boxed{[0,1]}", 1.0),
    (r"(-\infty, 3)", r"\boxed{(-\infty,3)}", 1.0),
    (r"\{1, 2, 3\}", r"\boxed{\{3, 2, 1\}}", 1.0),
    (r"50\%", r"\boxed{50\%}", 1.0),
    (r"50\%", r"\boxed{0.5}", 1.0),
    (r"50\%", r"\boxed{50}", 1.0),  # MATH's convention: the percent sign may be left out
    (r"x^2 + 2x + 1", r"\boxed{(x+1)^2}", 1.0),
    (r"\pi", r"\boxed{\pi}", 1.0),
    (r"2\pi", r"\boxed{2 \pi}", 1.0),
    (r"\sqrt{8}", r"\boxed{2\sqrt{2}}", 1.0),
    (r"-3", r"\boxed{-3}", 1.0),
    (r"\frac{7}{2}", r"\boxed{3.5}", 1.0),
    (r"\dfrac{1}{3}", r"\boxed{\frac{1}{3}}", 1.0),
    (r"10", r"The final answer is $10$.", 1.0),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}", 1.0),
    (r"e^{2}", r"\boxed{e^2}", 1.0),
    (r"\sqrt{3}", r"\boxed{3^{1/2}}", 1.0),
    (r"\frac{\pi}{4}", r"\boxed{\pi/4}", 1.0),
    (r"2+3i", r"\boxed{3i+2}", 1.0),
    (r"x = 2", r"\boxed{2}", 1.0),
    (r"\frac{a}{b}", r"\boxed{a/b}", 1.0),
    (r"5", r"first \boxed{3}, then corrected: \boxed{5}", 1.0),
    (r"\boxed{42}", r"6 \cdot 7 = 42, so the answer is $\boxed{42}$", 1.0),
    (r"\frac{1}{2}", r"\boxed{0.6}", 0.0),
    (r"3", r"\boxed{4}", 0.0),
    (r"(1, 2)", r"\boxed{[1,2]}", 0.0),
    (r"\{1, 2\}", r"\boxed{\{1, 2, 3\}}", 0.0),
    (r"\sqrt{2}", r"\boxed{2}", 0.0),
    (r"-3", r"\boxed{3}", 0.0),
    (r"x^2", r"\boxed{2x}", 0.0),
    (r"\pi", r"\boxed{3.14}", 0.0),
    (r"\frac{3}{4}", r"\boxed{\frac{4}{3}}", 0.0),
    (r"10", r"The answer is 11. \boxed{11}", 0.0),
    (r"0.5", r"\boxed{5}", 0.0),
    (r"2\pi", r"\boxed{\pi}", 0.0),
    (r"[0, 1]", r"\boxed{[0, 2]}", 0.0),
    (r"7", r"no answer here", 0.0),
    (r"1", r"\boxed{-1}", 0.0),
    (r"\frac{1}{3}", r"\boxed{0.33}", 0.0),
    (r"e", r"\boxed{2}", 0.0),
    ("", r"\boxed{1}", None),
]


def test_math_verify_against_hand_checked_pairs():
    references, completions, expected = zip(*MATH_TABLE, strict=True)
    assert len(MATH_TABLE) >= 40
    got = math_verify(None, list(completions), answer=list(references))
    wrong = [
        (r, c, e, g)
        for r, c, e, g in zip(references, completions, expected, got, strict=True)
        if g != e
    ]
    assert not wrong


def test_format_rewards():
    assert boxed_format(
        None, [r"\boxed{1}", r"\boxed{1} \boxed{2}", r"\boxed{", r"\boxed{ }", "1"]
    ) == [
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ]
    texts = [
        "<think>a</think>b",
        "<think></think>b",
        "<think>a</think>",
        "x<think>a</think>b",
        "<think>a<think>b</think>c",
    ]
    assert think_format(None, texts) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert gsm8k_strict(
        None, ["#### 3", "#### 4", "3"], answer=["1+2=3\n#### 3", "3", "#### 3"]
    ) == [1.0, 0.0, 0.0]
    assert gsm8k_strict(None, ["#### 3"], answer=["no number"]) == [None]


def _trl_call(function, inputs: list[dict], completions: list, completion_ids: list):
    """How TRL 1.x's `GRPOTrainer._calculate_rewards` calls a reward function: keywords, every
    column except the prompt and the completion, and the trainer state."""
    keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
    reward_kwargs = {key: [example[key] for example in inputs] for key in keys}
    return function(
        prompts=[x["prompt"] for x in inputs],
        completions=completions,
        completion_ids=completion_ids,
        trainer_state=None,
        **reward_kwargs,
    )


def _scores(task, completions: list[str], rows: list[int]) -> np.ndarray:
    encoded = [task.tokenizer.encode(c, add_special_tokens=False) for c in completions]
    width = max(map(len, encoded))
    tokens = np.zeros((len(encoded), width), np.int32)
    mask = np.zeros((len(encoded), width), bool)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)], mask[row, : len(ids)] = ids, True
    return task.reward().scorer(tokens, mask, np.asarray(rows))


def test_the_same_function_runs_under_trl_and_gradflow(root):
    raw = _raw(root)
    raw["reward"].append({"function": f"{root}/rewards.py:by_level", "weight": 0.5})
    task = build_task(build_config(raw))
    completions = ["12+30=42\n#### 42", "50-8=42\n#### 41", "#### 2"]
    got = _scores(task, completions, [0, 1, 2])
    for row, name in enumerate(("exact", "by_level")):
        function = from_spec(f"{root}/rewards.py:{name}").function
        ids = [task.tokenizer.encode(c, add_special_tokens=False) for c in completions]
        expected = _trl_call(function, ROWS, completions, ids)
        np.testing.assert_array_equal(got[row], [np.nan if e is None else e for e in expected])
    np.testing.assert_array_equal(got[-1], [0, 0, 0])  # nothing failed
    assert task.reward().parts == ("exact", "by_level", "failed")
    assert "level" in task.train.columns and task.train.columns["answer"] == ["42", "42", "2"]


def _chat_tokenizer(root: Path) -> Path:
    """The character tokenizer with a chat template (roles and contents on lines)."""
    path = root / "chat_tokenizer"
    if not path.is_dir():
        source = tokenizer_dir(root)
        path.mkdir()
        for file in source.iterdir():
            (path / file.name).write_bytes(file.read_bytes())
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = (
            "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}"
        )
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_chat_prompts_give_message_completions(root):
    data = root / "chat.jsonl"
    messages = [{"role": "user", "content": "1+1=?"}]
    data.write_text(json.dumps({"prompt": messages, "solution": "2"}) + "\n")
    raw = _raw(root, train=str(data), test=str(data), prompt_template="chat", system="be brief")
    raw["model"]["tokenizer"] = str(_chat_tokenizer(root))
    task = build_task(build_config(raw))
    text = task.tokenizer.decode(task.train_prompts.ids[0][task.train_prompts.mask[0]])
    assert text == "system be brief\nuser 1+1=?\nassistant "
    batch = task.batch(task.train, [0], [task.tokenizer.encode("#### 2", add_special_tokens=False)])
    assert batch.prompts == [messages]
    assert batch.completions == [[{"role": "assistant", "content": "#### 2"}]]
    np.testing.assert_array_equal(task.scorer.score(batch, [0])[0], [[1.0]])


def _arithmetic(root: Path, **task) -> dict:
    return {
        "model": {"path": "gradflow:toy-arith", "tokenizer": str(_chat_tokenizer(root))},
        "task": {"name": "arithmetic", "train_size": 300, "test_size": 30, **task},
        "algorithm": {"name": "grpo"},
    }


def test_arithmetic_questions_as_chat(root):
    """The arithmetic task's knobs shape its questions, and with `prompt_template = "chat"` each
    question is one user turn (with the instruction) through the chat template, graded
    flexibly as GSM8K answers are."""
    raw = _arithmetic(
        root,
        num_operands=[2, 2],
        max_value=9,
        operators="+",
        prompt_template="chat",
        system="be brief",
        instruction="answer with the number only",
        reward_mode="flexible",
        train_size=60,
        test_size=5,
    )
    task = build_task(build_config(raw))
    questions = task.train.columns["question"]
    assert len(questions) == 60
    for question in questions:
        a, b = re.fullmatch(r"(\d)\+(\d)=\?", question).groups()
    prompts = task.train_prompts
    text = task.tokenizer.decode(prompts.ids[-1][prompts.mask[-1].astype(bool)])
    assert text == f"system be brief\nuser {question}\nanswer with the number only\nassistant "
    right = task.tokenizer.encode(f"{a}+{b} = {int(a) + int(b)}", add_special_tokens=False)
    wrong = task.tokenizer.encode(f"{int(a) + int(b) + 1}", add_special_tokens=False)
    batch = task.batch(task.train, [59, 59], [right, wrong])
    np.testing.assert_array_equal(task.scorer.score(batch, [0])[0], [[1.0, 0.0]])
    plain = build_task(build_config(_arithmetic(root, train_size=20, test_size=5)))
    assert plain.tokenizer.decode(plain.train_prompts.ids[0][plain.train_prompts.mask[0]]) == (
        plain.train.columns["question"][0] + "\n"
    )


def test_arithmetic_knobs_are_checked(root):
    with pytest.raises(ConfigError, match="task] arithmetic: operators"):
        build_task(build_config(_arithmetic(root, operators="*")))
    with pytest.raises(ConfigError, match="num_operands"):
        build_task(build_config(_arithmetic(root, num_operands=[1, 2])))
    with pytest.raises(ConfigError, match="task.max_value applies to task.name = 'arithmetic'"):
        build_config({**_raw(root), "task": {**_raw(root)["task"], "max_value": 9}})


def test_every_format_reads_the_same_rows(root):
    table = pa.Table.from_pylist(ROWS)
    files = {
        "rows.jsonl": None,
        "rows.json": lambda p: p.write_text(json.dumps(ROWS)),
        "rows.parquet": lambda p: pq.write_table(table, p),
        "rows.csv": lambda p: datasets.Dataset.from_list(ROWS).to_csv(str(p), index=False),
        "rows_dir": lambda p: datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(ROWS)}
        ).save_to_disk(str(p)),
    }
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name, write in files.items():
        if write is not None:
            write(root / name)
        rows = read_rows(str(root / name), split="train", what="task.train")
        assert {k: [str(v) for v in vs] for k, vs in rows.columns.items()} == {
            k: [str(r[k]) for r in ROWS] for k in ROWS[0]
        }, name


# verl's schema, as its preprocessing (examples/data_preprocess/gsm8k.py) writes it: a data
# source, the prompt as chat messages, the ability, the reference under
# reward_model.ground_truth, and extra_info with the split, the row index, the raw answer and
# question.
VERL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("answer", pa.string()),
                    ("question", pa.string()),
                ]
            ),
        ),
    ]
)
VERL_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def _verl_gsm8k_file(path: Path, split: str) -> None:
    """A Parquet file in verl's GSM8K schema (nested struct columns), written with pyarrow."""
    rows = []
    for index, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8)]):
        question = f"what is {a} plus {b}?"
        rows.append(
            {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": f"{question} {VERL_INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {
                    "split": split,
                    "index": index,
                    "answer": f"{a}+{b}={a + b}\n#### {a + b}",
                    "question": question,
                },
            }
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=VERL_SCHEMA), path)


def test_a_verl_gsm8k_parquet_file_trains_as_it_is(root, tmp_path):
    """A file from verl's preprocessing and a verl `compute_score` train with the data paths and
    `style = "verl"` alone: no answer_key (the reference is reward_model.ground_truth), no
    prompt_template (chat messages go through the chat template)."""
    for split in ("train", "test"):
        _verl_gsm8k_file(tmp_path / f"{split}.parquet", split)
    assert pq.read_schema(tmp_path / "train.parquet").equals(VERL_SCHEMA)
    config = tiny_config(
        root,
        tmp_path / "run",
        "verl",
        model={
            "tokenizer": str(_chat_tokenizer(root)),
            "overrides": {**MODEL_OVERRIDES, "max_position_embeddings": 256},
        },
        task={
            "name": "dataset",
            "train": str(tmp_path / "train.parquet"),
            "test": str(tmp_path / "test.parquet"),
            "reward_workers": 1,
        },
        train={"steps": 2, "prompts_per_step": 2},
        checkpoint={"every": 0},
    )
    with open(config, "a") as handle:
        handle.write(f'[[reward]]\nfunction = "{root}/rewards.py:verl_gsm8k"\nstyle = "verl"\n')
    task = build_task(load_config(config, ["task.reward_workers=0"]))
    assert task.train.columns["answer"] == ["3", "7", "11", "15"]
    text = task.tokenizer.decode(task.train_prompts.ids[0][task.train_prompts.mask[0]])
    assert text.startswith("user what is 1 plus 2?") and text.endswith("\nassistant ")
    completions = ["so #### 3", "#### 8", "#### 11"]
    np.testing.assert_array_equal(_scores(task, completions, [0, 1, 2])[0], [1.0, 0.0, 1.0])
    assert main([str(config)]) == 0
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics if "reward/verl_gsm8k" in m] == [1, 2]
    assert all(m["reward/failed"] == 0.0 for m in metrics if "reward/failed" in m)
    assert "eval/verl_gsm8k" in metrics[-1]


def test_a_verl_file_takes_an_answer_key_of_its_own(root, tmp_path):
    _verl_gsm8k_file(tmp_path / "train.parquet", "train")
    path = str(tmp_path / "train.parquet")
    raw = _raw(root, train=path, test=path, prompt_template="chat")
    raw["model"]["tokenizer"] = str(_chat_tokenizer(root))
    raw["reward"] = [{"function": f"{root}/rewards.py:verl_gsm8k", "style": "verl"}]
    raw["task"]["answer_key"] = "extra_info.answer"
    task = build_task(build_config(raw))
    assert task.train.columns["answer"][0] == "1+2=3\n#### 3"
    raw["task"]["answer_key"] = "extra_info.solution"
    assert "task.answer_key = 'extra_info.solution'" in _error(raw)


def test_failures_cost_only_their_samples_in_the_worker_pool(root):
    functions = tuple(
        from_spec(f"{root}/rewards.py:{name}")
        for name in ("raises_on_boom", "hangs_on_hang", "nan_on_nan")
    )
    scorer = Scorer(functions, workers=2, timeout_s=3.0)
    texts = ["fine", "boom", "hang", "nan", "fine"]
    from gradflow.tasks.reward_functions import Batch

    batch = Batch(texts, texts, [[1]] * 5, {})
    try:
        start = time.perf_counter()
        values, failed = scorer.score(batch, [0, 1, 2])
        elapsed = time.perf_counter() - start
        again, _ = scorer.score(batch, [0])  # the pool survived the killed worker
    finally:
        scorer.close()
    np.testing.assert_array_equal(values[0], [1, 0, 1, 1, 1])
    np.testing.assert_array_equal(values[1], [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(values[2], [0.5, 0.5, 0.5, 0, 0.5])
    np.testing.assert_array_equal(failed, [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(again, values[:1])
    assert elapsed < 30


def test_in_process_failures_are_counted():
    def raises(prompts, completions, **kwargs):
        if "boom" in completions:
            raise RuntimeError("boom")
        return [1.0] * len(completions)

    scorer = Scorer((RewardFunction("raises", raises),), workers=2, timeout_s=1.0)
    assert scorer.workers == 0  # a local function cannot reach worker processes
    from gradflow.tasks.reward_functions import Batch

    values, failed = scorer.score(Batch(["a", "boom"], ["a", "boom"], [[1], [1]], {}), [0])
    np.testing.assert_array_equal(values, [[1.0, 0.0]])
    np.testing.assert_array_equal(failed, [0.0, 1.0])


# Bad input: one clear error naming the thing.


def _error(raw: dict) -> str:
    with pytest.raises(
        (ConfigError, DataError, FileNotFoundError, RewardFunctionError, ValueError)
    ) as info:
        build_task(build_config(raw))
    return str(info.value)


def test_bad_data_files(root, tmp_path):
    assert f"no data file or directory at {tmp_path / 'none.jsonl'}" in _error(
        _raw(root, train=str(tmp_path / "none.jsonl"))
    )
    (tmp_path / "rows.txt").write_text("hello")
    message = _error(_raw(root, train=str(tmp_path / "rows.txt")))
    assert "unknown format '.txt'" in message and ".parquet" in message
    message = _error(_raw(root, prompt_key="question"))
    assert f"task.prompt_key = 'question': {root / 'train.jsonl'} has no such column" in message
    assert "its columns: prompt, solution, level" in message
    assert "task.answer_key = 'answer'" in _error(_raw(root, answer_key="answer"))
    (tmp_path / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    assert "has no rows" in _error(_raw(root, test=str(tmp_path / "empty.parquet")))


def test_bad_reward_functions(root, tmp_path):
    def with_reward(function: str) -> dict:
        raw = _raw(root)
        raw["reward"] = [{"function": function}]
        return raw

    missing = tmp_path / "nowhere.py"
    assert f"reward function {missing}:f: no file {missing}" in _error(with_reward(f"{missing}:f"))
    assert "reward function no_such_package.mod:f: no module no_such_package.mod" in _error(
        with_reward("no_such_package.mod:f")
    )
    message = _error(with_reward(f"{root}/rewards.py:exactt"))
    assert f"{root}/rewards.py has no 'exactt' (did you mean 'exact'?)" in message
    (tmp_path / "broken.py").write_text("import no_such_module\n")
    message = _error(with_reward(f"{tmp_path}/broken.py:f"))
    assert f"importing {tmp_path}/broken.py failed (ModuleNotFoundError" in message
    assert "must look like FILE.py:NAME" in _error(with_reward("exact"))
    assert "reward function too_few returned 1 values for 2 completions" in _error(
        with_reward(f"{root}/rewards.py:too_few")
    )
    assert "reward function words returned str 'yes' at position 0" in _error(
        with_reward(f"{root}/rewards.py:words")
    )
    raw = _raw(root)
    raw["reward"] = []
    assert "needs at least one [[reward]]" in _error(raw)
    raw = _raw(root, correct_weight=2.0)
    assert "task.correct_weight configures the built-in rewards" in _error(raw)


def test_reward_workers_run_only_while_the_trainer_runs(root, tmp_path):
    from gradflow.config import load_config
    from gradflow.train import Trainer

    config = tiny_config(
        root,
        tmp_path / "run",
        "workers",
        task={
            "name": "dataset",
            "train": str(root / "train.jsonl"),
            "test": str(root / "train.jsonl"),
            "answer_key": "solution",
            "prompt_template": "plain",
            "reward_workers": 1,
        },
        train={"steps": 1, "prompts_per_step": 2},
        checkpoint={"every": 0},
    )
    with open(config, "a") as handle:
        handle.write(f'[[reward]]\nfunction = "{root}/rewards.py:exact"\n')
    (tmp_path / "run").mkdir()
    trainer = Trainer(load_config(config), tmp_path / "run")
    scorer = trainer.task.scorer
    assert scorer.workers == 1 and scorer._pool is None  # built, not run: no worker processes
    trainer.run()
    assert scorer._pool is None and scorer._starting is None  # stopped when the run ended
