"""The runner as a user runs it: the shipped configs, each for 2 tiny steps, in this process.

Every `configs/<algorithm>.toml` trains through `load_config` + `train` (8 sequences per step
over the 8 test devices) and leaves a whole run directory: the resolved config, metrics,
samples, curves, checkpoints and an HF export that transformers loads. One run logs to W&B
offline and its transaction log is read back record by record. Also: `--print-config`, an
algorithm swapped through the config against the same algorithm built in Python, and the GSM8K
pipeline (real Qwen2 tokenizer, chat template, random weights) through `pipelines/eval.py`.

Determinism across runs with the same seed is covered by `test_resume.py`.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from google.protobuf.message import DecodeError
from safetensors.numpy import load_file

from gradflow import algorithms
from gradflow.batch import Prompts
from gradflow.checkpoint import STATE_FILE, list_checkpoints, read_manifest
from gradflow.config import build_config, load_config
from gradflow.models import load_hf
from gradflow.run_log import wandb_records
from gradflow.sharding import shard_prompts, shard_state
from gradflow.stages import RLOO
from gradflow.state import init_state
from gradflow.step import step
from gradflow.tasks.gsm8k import load_gsm8k
from gradflow.train import Trainer, load_policy, prompt_indices, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALGORITHMS = ("grpo", "ppo", "reinforce", "rloo", "reinforce_pp", "dapo")
WANDB_RUN = "grpo"  # the one run logging to W&B (offline); the other five have it disabled
# 4 prompts × 2 completions = 8 sequences: one per test device, and PPO's 4 minibatches of 2.
TINY = (
    "train.steps=2",
    "train.prompts_per_step=4",
    "algorithm.group_size=2",
    "algorithm.max_new_tokens=16",
    "eval.size=8",
    "eval.every=1",
    "task.train_size=64",
    "task.test_size=8",
    "logging.progress=false",
    "checkpoint.every=1",
    "logging.samples_every=1",
)
STEP_KEYS = ("step", "reward/mean", "time/step_s", "throughput/tokens_per_s")
RANDOM_QWEN2 = (
    'model.path=""',
    'model.init="random"',
    'model.config="gradflow:qwen2/qwen2-1.5b-instruct.config.json"',
    "model.overrides={hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, "
    "num_kv_heads=2, head_dim=8}",
)


def _pipeline(name: str):
    """`pipelines/<name>.py` as a module."""
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", ROOT / "pipelines" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _read(log: Path) -> list:
    """The records of a W&B log written so far (none while its last record is cut short)."""
    try:
        return list(wandb_records(log))
    except DecodeError:
        return []


def _run(root: Path, name: str) -> Path:
    """Trains `configs/<name>.toml` with the tiny overrides into `root/<name>`."""
    run_dir = root / name
    mode = "offline" if name == WANDB_RUN else "disabled"
    config = load_config(
        CONFIGS / f"{name}.toml",
        [*TINY, f"run.output_dir={run_dir}", f'logging.wandb="{mode}"'],
    )
    with pytest.MonkeyPatch.context() as env:
        # WANDB_MODE wins over logging.wandb: leave the config in charge.
        env.delenv("WANDB_MODE", raising=False)
        out_dir, final = train(config, config_name=name)
    assert out_dir == run_dir and set(final) == {
        "eval/accuracy",
        "eval/accuracy_flexible",
        "eval/failed",
    }
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(name)`: the run directory of `configs/<name>.toml`, trained once per module."""
    root = tmp_path_factory.mktemp("runs")
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = _run(root, name)
        return done[name]

    return get


@eqx.filter_jit
def _logits(model, ids, mask):
    return model(ids, mask)


def _check_export(run_dir: Path) -> None:
    """`hf/` loads with transformers, its logits match `load_hf`'s, and it holds the policy of
    the last checkpoint."""
    export = run_dir / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    ids = np.asarray([tokenizer.encode("12+34-5=?\n", add_special_tokens=False)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids, dtype=torch.long)).logits[0].numpy()
    policy = load_hf(export)
    ours = np.asarray(_logits(policy, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, bool)))
    np.testing.assert_allclose(ours[0], expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    saved = load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / STATE_FILE))
    for path, leaf in jax.tree_util.tree_flatten_with_path(policy)[0]:
        name = ".policy" + jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(leaf), saved[name], err_msg=name)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_shipped_config_runs_and_writes_its_run_directory(runs, name):
    run_dir = runs(name)

    written = load_config(run_dir / "config.toml")
    assert written.algorithm_name == name
    assert written.train.steps == 2 and written.run.output_dir == str(run_dir)

    records = _jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 1, 2, 2]
    for record in records:
        for key, value in record.items():
            assert isinstance(value, int | float) and math.isfinite(value), (key, value)
    trained = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in trained] == [1, 2]
    for record in trained:
        assert set(STEP_KEYS) <= set(record)
    evaluations = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 1, 2]
    assert 0.0 <= evaluations[0]["eval/accuracy"] <= 1.0

    samples = _jsonl(run_dir / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [1, 2]
    for sample in samples:
        assert isinstance(sample["prompt"], str) and sample["prompt"]
        assert isinstance(sample["completion"], str)
        assert math.isfinite(sample["reward"])

    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_00000001", "step_00000002"]
    manifest = read_manifest(checkpoints[-1])
    assert manifest["step"] == 2 and manifest["algorithm"] == name
    _check_export(run_dir)
    assert (run_dir / "wandb").is_dir() == (name == WANDB_RUN)


def test_wandb_offline_run_holds_the_config_and_the_metric_history(runs):
    run_dir = runs(WANDB_RUN)
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # W&B's service may still be writing the log when `finish()` returns: wait for its exit.
    deadline = time.monotonic() + 60
    records = _read(log)
    while "exit" not in {r.WhichOneof("record_type") for r in records}:
        assert time.monotonic() < deadline, "the W&B log has no exit record"
        time.sleep(0.2)
        records = _read(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algorithm"]["name"] == WANDB_RUN
    assert config["train"]["steps"] == 2
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            history[record.history.step.num] = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items
            }
    assert sorted(history) == [0, 1, 2]
    for logged in _jsonl(run_dir / "metrics.jsonl"):
        for key, value in logged.items():
            if key != "step":
                assert history[logged["step"]][key] == pytest.approx(value, rel=1e-12)
    assert "reward/mean" in history[1] and "reward/mean" in history[2]


def test_wandb_online_without_a_reachable_server_logs_offline(tmp_path):
    """`online` with an API key but no W&B server to reach: a one-line notice, then an offline
    run (a real `wandb.init` against a closed local port, in a fresh process so that W&B's
    service and settings are its own)."""
    script = (
        "import sys; from pathlib import Path\n"
        "from gradflow.config import load_config\n"
        "from gradflow.run_log import RunLogger\n"
        "config = load_config(sys.argv[1], ['logging.wandb=\"online\"'])\n"
        "log = RunLogger(Path(sys.argv[2]), config, resumed_step=None)\n"
        "log.log(1, {'reward/mean': 0.5})\n"
        "log.finish()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY="a" * 40, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="2")
    done = subprocess.run(
        [sys.executable, "-c", script, str(CONFIGS / "grpo.toml"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "W&B: cannot reach the server" in done.stdout
    assert len(list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))) == 1


def test_print_config_prints_the_resolved_toml_and_writes_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a run would go to ./runs/grpo-<time>
    path = CONFIGS / "grpo.toml"
    assert _pipeline("run.py").main([str(path), "algorithm.kl_coef=0.01", "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["algorithm"]["kl_coef"] == 0.01
    expected = load_config(path, ["algorithm.kl_coef=0.01"])
    assert build_config(printed, source=str(path)) == expected
    assert list(tmp_path.iterdir()) == []
    # Overrides may also come after an option.
    assert _pipeline("run.py").main([str(path), "--print-config", "train.steps=3"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["train"]["steps"] == 3


def test_algorithm_from_the_config_equals_the_one_built_in_python(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    overrides = [
        'algorithm.name="rloo"',  # every key of configs/grpo.toml is an rloo key too
        "algorithm.group_size=4",
        "train.prompts_per_step=8",  # enough groups that some have unequal rewards
        "task.train_size=64",
        "task.test_size=8",
        'logging.wandb="disabled"',
        f"run.output_dir={tmp_path}",
    ]
    config = load_config(CONFIGS / "grpo.toml", overrides)
    trainer = Trainer(config, tmp_path)
    assert isinstance(trainer.algorithm.advantage, RLOO)
    # The same hyperparameters, read from the file itself.
    written = tomllib.loads((CONFIGS / "grpo.toml").read_text())["algorithm"]
    hyperparameters = {k: v for k, v in written.items() if k != "name"} | {"group_size": 4}
    # The reward stage is the task's; the same stage keeps both steps one compiled program.
    python = algorithms.make(
        "rloo",
        reward=trainer.algorithm.reward,
        eos_token_ids=trainer.task.eos_token_ids,
        pad_token_id=trainer.task.pad_token_id,
        **hyperparameters,
    )
    assert eqx.tree_equal(python, trainer.algorithm)
    seed = config.run.seed
    state = shard_state(
        init_state(python, load_policy(config), key=jax.random.key(seed)), trainer.mesh
    )
    initial = jax.device_get(state.policy)

    bank = trainer.task.train_prompts
    rows = prompt_indices(0, 8, bank.ids.shape[0], seed)
    prompts = shard_prompts(
        Prompts(
            ids=jnp.asarray(bank.ids[rows]),
            mask=jnp.asarray(bank.mask[rows]),
            index=jnp.asarray(rows),
        ),
        trainer.mesh,
    )
    key = jax.random.fold_in(jax.random.key(seed), 0)
    from_config, metrics = step(trainer.algorithm, trainer.state, prompts, key, mesh=trainer.mesh)
    from_python, _ = step(python, state, prompts, key, mesh=trainer.mesh)

    assert float(metrics["grad_norm"]) > 0  # the step did update the policy
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), initial, from_config.policy)
    assert any(jax.tree.leaves(changed))
    for a, b in zip(
        jax.tree.leaves(from_config.policy), jax.tree.leaves(from_python.policy), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gsm8k_pipeline_on_random_weights_then_eval(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "gsm8k"
    config = load_config(
        CONFIGS / "gsm8k" / "qwen25_0p5b_grpo.toml",
        [
            *RANDOM_QWEN2,
            "train.steps=2",
            "train.prompts_per_step=4",
            "algorithm.group_size=2",
            "algorithm.max_new_tokens=8",
            "task.train_size=16",
            "task.test_size=4",
            "eval.size=4",
            "logging.progress=false",
            "logging.samples_every=1",
            'logging.wandb="disabled"',
            f"run.output_dir={run_dir}",
        ],
    )
    assert config.task.name == "gsm8k" and config.task.prompt_template == "chat"
    assert config.model.compute_dtype == "bfloat16"
    # The transpose of jax.nn.dot_product_attention's bfloat16 × bfloat16 → float32 logits is
    # a mixed float32/bfloat16 dot whose lowering asks for a promotion, which the tests' strict
    # mode refuses (a JAX limitation; users run with standard promotion).
    with jax.numpy_dtype_promotion("standard"):
        _, final = train(config, config_name="qwen25_0p5b_grpo")
    assert set(final) == {"eval/accuracy", "eval/accuracy_flexible", "eval/failed"}
    records = _jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 2]
    assert all(math.isfinite(r["reward/mean"]) for r in records if "reward/mean" in r)
    samples = _jsonl(run_dir / "samples.jsonl")
    train_questions = {p.question for p in load_gsm8k("train")[:16]}
    assert len(samples) == 8 and {s["prompt"] for s in samples} <= train_questions
    assert [c.name for c in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002"]
    assert (run_dir / "hf" / "tokenizer.json").is_file() and (run_dir / "curves.png").is_file()
    capsys.readouterr()

    status = _pipeline("eval.py").main([str(run_dir), "--size", "4", "--samples", "2"])
    out = capsys.readouterr().out
    assert status == 0, out
    for metric in ("eval/accuracy", "eval/accuracy_flexible", "eval/pass@2", "eval/maj@2"):
        assert any(line.split()[:1] == [metric] for line in out.splitlines()), out
    completions = _jsonl(run_dir / "eval" / "test_hf.jsonl")
    assert f"completions: {run_dir / 'eval' / 'test_hf.jsonl'}" in out
    assert len(completions) == 4
    assert {"question", "completion", "accuracy", "accuracy_flexible"} <= set(completions[0])


def test_gsm8k_configs_load_and_name_the_model_to_download(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no models/ here
    main = _pipeline("run.py").main
    for path in sorted((CONFIGS / "gsm8k").glob("*.toml")):
        config = load_config(path)
        assert config.task.name == "gsm8k" and config.model.init == "pretrained"
        model = Path(config.model.path).name
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert f"huggingface-cli download Qwen/{model} --local-dir models/{model}" in err, err
        assert "Traceback" not in err
