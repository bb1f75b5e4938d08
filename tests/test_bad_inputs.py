"""The bad-input catalogue, each case run as the user sees it.

Config and data mistakes go through `pipelines/run.py`'s `main` in this process (they fail
before anything compiles); failures during training (NaN/inf, a full disk, Ctrl-C) run
`pipelines/run.py` in subprocesses, started together by a module fixture. Every case ends with
one `error: ...` line naming the culprit, a non-zero exit status and no traceback, and leaves
what was already written in place.
"""

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from child_run import MODEL_OVERRIDES, ROOT, child_env, run_child, tiny_config
from safetensors.numpy import load_file

from gradflow.assets import resolve_path
from gradflow.batch import Prompts
from gradflow.checkpoint import CheckpointWriteError, list_checkpoints, save_checkpoint
from gradflow.config import load_config
from gradflow.models import ModelConfig, init_from_config, save_hf
from gradflow.rollout import Completions
from gradflow.stages import HostReward
from gradflow.train import Trainer

sys.path.insert(0, str(ROOT / "pipelines"))
from run import main  # noqa: E402

TIMEOUT = 300


def _fails(capsys, config: Path, *overrides: str, status: int = 2) -> str:
    """Runs `main`, checks the one-line error and the exit status; returns the message."""
    assert main([str(config), *overrides]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


@pytest.fixture
def config(root, tmp_path) -> Path:
    return tiny_config(root, tmp_path / "run", tmp_path.name)


# Config, model and data mistakes (in this process).


def test_misspelt_key_suggests_the_right_one(capsys, config):
    message = _fails(capsys, config, "train.step=3")
    assert "unknown key train.step (did you mean 'steps'?)" in message


def test_wrong_type_names_key_and_type(capsys, config):
    message = _fails(capsys, config, "train.steps=many")
    assert "train.steps: expected int, got str 'many'" in message


def test_missing_model_path_says_what_to_pass(capsys, config, tmp_path):
    assert "model.path is empty" in _fails(capsys, config, 'model.init="pretrained"')
    missing = tmp_path / "no_such_model"
    message = _fails(
        capsys, config, 'model.init="pretrained"', f"model.path={missing}", "model.overrides={}"
    )
    assert f"model.path {missing} does not exist" in message and "huggingface-cli" in message


def test_missing_tokenizer_path(capsys, config, tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    assert f"no tokenizer directory at {missing}" in _fails(
        capsys, config, f"model.tokenizer={missing}"
    )


def test_model_and_tokenizer_vocabularies_differ(capsys, config):
    overrides = {**MODEL_OVERRIDES, "vocab_size": 16}
    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in overrides.items())
    message = _fails(capsys, config, f"model.overrides={{ {inline} }}")
    assert "the tokenizer has 47 tokens but the model's vocabulary has 16" in message


def test_prompt_longer_than_the_context(capsys, config):
    overrides = {**MODEL_OVERRIDES, "max_position_embeddings": 12}
    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in overrides.items())
    message = _fails(capsys, config, f"model.overrides={{ {inline} }}")
    assert "prompt (11 tokens) + algorithm.max_new_tokens (6) = 17 tokens" in message
    assert "exceeds the model's context of 12" in message


def test_trajectory_longer_than_the_context_names_the_keys_that_add_up(capsys, tmp_path):
    """A multi-turn trajectory's budget is the user's [environment] keys, not a
    max_new_tokens they never wrote."""
    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        "environment.max_turn_tokens=40",
        "environment.max_observation_tokens=32",
    ]
    message = _fails(capsys, ROOT / "configs/examples/multi_turn.toml", *overrides)
    assert (
        "prompt (11 tokens) + environment.max_turns × (environment.max_turn_tokens + "
        "environment.max_observation_tokens) = 11 + 2 × (40 + 32) = 155 tokens exceeds the "
        "model's context of 128"
    ) in message
    assert "max_new_tokens" not in message


def test_keys_that_are_spelt_otherwise_say_what_to_write(capsys, config):
    message = _fails(capsys, config, "model.overrides={ num_hiden_layers = 2 }")
    assert "model.overrides: 'num_hiden_layers' (did you mean 'num_hidden_layers'?)" in message
    assert "num_layers (num_hidden_layers)" in message
    message = _fails(capsys, config, "environment.class=examples/envs/retry.py:Retry")
    assert (
        "remove algorithm.max_new_tokens (6) and write environment.max_turn_tokens = 6" in message
    )


def test_mesh_that_does_not_fit_the_devices_or_the_batch(capsys, config):
    assert "do not divide by the fixed [mesh] axes (3)" in _fails(capsys, config, "mesh.fsdp=3")
    # 8 test devices: 3 prompts × 4 completions do not split over data = 8.
    message = _fails(capsys, config, "train.prompts_per_step=3")
    assert "3 × 4 = 12 sequences do not divide over mesh.data × mesh.fsdp" in message


def test_incomplete_multi_process_settings(capsys, config, monkeypatch):
    monkeypatch.setenv("GRADFLOW_COORDINATOR", "127.0.0.1:1234")
    message = _fails(capsys, config)
    assert "needs all of --coordinator/GRADFLOW_COORDINATOR, --num-processes" in message
    monkeypatch.setenv("GRADFLOW_NUM_PROCESSES", "two")
    assert "GRADFLOW_NUM_PROCESSES='two' must be an integer" in _fails(capsys, config)


def _gsm8k(config: Path, path: Path) -> tuple[str, ...]:
    return (
        str(config),
        'task.name="gsm8k"',
        'task.prompt_template="plain"',
        f"task.train={path}",
    )


def test_malformed_data_line_names_file_and_line(capsys, config, tmp_path):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"question": "1+1?", "answer": "#### 2"})
    data.write_text(good + "\n" + '{"question": "2+2?", "answer": \n')
    _, *overrides = _gsm8k(config, data)
    assert f"{data}:2: invalid JSON" in _fails(capsys, config, *overrides)
    data.write_text(good + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    assert f'{data}:2: missing field "answer"' in _fails(capsys, config, *overrides)


def test_empty_dataset(capsys, config, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    _, *overrides = _gsm8k(config, data)
    assert f"no problems in {data}" in _fails(capsys, config, *overrides)
    assert "task.train_size: must be >= 1, got 0" in _fails(capsys, config, "task.train_size=0")
    assert "eval.batch_size: must be >= 1, got 0" in _fails(capsys, config, "eval.batch_size=0")
    assert "train.steps: must be >= 1, got -1" in _fails(capsys, config, "train.steps=-1")


# A reward scorer that fails (in this process); reward functions that fail: test_tasks.py.


def test_a_scorer_that_raises_costs_its_batch_not_the_step():
    def scorer(tokens, mask, index):
        raise RuntimeError("a bug in a user's scorer")

    reward = HostReward(scorer=scorer, parts=("score", "failed"), weights=(1.0, 0.0))
    completions = Completions(
        tokens=jnp.zeros((3, 4), jnp.int32),
        mask=jnp.ones((3, 4), bool),
        logprobs=jnp.zeros((3, 4), jnp.float32),
        sampling_logprobs=jnp.zeros((3, 4), jnp.float32),
        lengths=jnp.full((3,), 4, jnp.int32),
        finished=jnp.ones((3,), bool),
    )
    prompts = Prompts(
        ids=jnp.zeros((3, 2), jnp.int32),
        mask=jnp.ones((3, 2), bool),
        index=jnp.zeros((3,), jnp.int32),
    )
    out = eqx.filter_jit(reward)(prompts, completions)
    np.testing.assert_array_equal(out.total, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(out.parts["failed"], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(out.applicable["score"], [False, False, False])


# A checkpoint directory that cannot be written (in this process).


def test_file_where_the_checkpoint_directory_should_be(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("not a directory")
    state = {"w": jnp.ones((2,), jnp.float32)}
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint .* File exists"):
        save_checkpoint(blocker, state, 1, {})
    assert blocker.read_text() == "not a directory"


# Failures during training (subprocesses, started together).


def _nan_model(root: Path) -> Path:
    """An HF model directory whose first query weight is NaN."""
    shape = ModelConfig.load(resolve_path("gradflow:qwen2/qwen2-1.5b-instruct.config.json"))
    model = init_from_config(shape.replace(**MODEL_OVERRIDES), key=jax.random.key(0))
    model = eqx.tree_at(
        lambda m: m.layers.q_proj, model, model.layers.q_proj.at[0, 0, 0].set(jnp.nan)
    )
    save_hf(model, root / "nan_model")
    return root / "nan_model"


@pytest.fixture(scope="module")
def training_failures(root):
    nan = _nan_model(root)
    cache = root / "jax_cache"
    pretrained = ['model.init="pretrained"', f"model.path={nan}", "model.overrides={}"]
    runs = {
        "nan_skip": (pretrained + ["train.steps=2", 'run.nonfinite="skip"'], {}),
        "nan_stop": (pretrained + ['run.nonfinite="stop"'], {}),
        "disk_full": ([], {"CHILD_FAIL_SAVE": "2", "CHILD_REWARD": "digits"}),
    }
    children = {}
    for name, (overrides, hooks) in runs.items():
        config = tiny_config(root, root / name, name)
        env = child_env(cache=cache, **hooks)
        children[name] = run_child(config, *overrides, env=env)
    yield {name: (root / name, child) for name, child in children.items()}
    for child in children.values():
        child.kill()


def _result(child) -> tuple[int, str]:
    out, _ = child.communicate(timeout=TIMEOUT)
    return child.returncode, out


def test_ctrl_c_saves_a_checkpoint_and_exits_130(capsys, root, training_failures):
    run_dir = root / "interrupted"
    overrides = ["train.steps=100000", "checkpoint.every=0"]
    config = tiny_config(root, run_dir, "interrupted")
    child = run_child(config, *overrides, env=child_env(cache=root / "jax_cache"))
    try:
        deadline = time.monotonic() + TIMEOUT
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and '"step": 1,' in metrics.read_text()):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGINT)
        status, out = _result(child)
    finally:
        child.kill()
    assert status == 130, out
    assert "Traceback" not in out
    (saved,) = list_checkpoints(run_dir / "checkpoints")
    step = int(saved.name.removeprefix("step_"))
    assert f"interrupted: checkpoint of step {step} saved" in out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert step >= 1 and records[-1]["step"] == step  # nothing logged was lost
    # That run is neither overwritten by a fresh run nor resumed under another config (one step
    # only, so that a missing check fails fast instead of training 100000 steps).
    short = ["train.steps=1", "checkpoint.every=0"]
    refused = _fails(capsys, config, *short)
    assert f"{run_dir} already holds a run: pass run.resume=true" in refused
    changed = _fails(capsys, config, *short, "run.resume=true", "run.seed=7")
    assert "was started with a different config (run.seed 0 -> 7)" in changed
    assert list_checkpoints(run_dir / "checkpoints") == [saved]
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == records


def test_output_dir_that_is_a_file(capsys, config, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("")
    assert "is a file: pass a directory" in _fails(capsys, config, f"run.output_dir={file}")
    missing = _fails(capsys, config, "run.resume=true", 'run.output_dir=""')
    assert "run.resume = true needs run.output_dir" in missing


def test_nonfinite_loss_skips_the_update_with_skip(training_failures):
    run_dir, child = training_failures["nan_skip"]
    status, out = _result(child)
    assert status == 0, out
    assert 'step 1: non-finite loss or gradient: update skipped (run.nonfinite = "skip")' in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update/skipped"] for r in records if "update/skipped" in r] == [1.0, 1.0]


def test_nonfinite_loss_stops_the_run_naming_the_step_with_stop(training_failures):
    run_dir, child = training_failures["nan_stop"]
    status, out = _result(child)
    assert status == 1, out
    assert "Traceback" not in out
    assert 'error: step 1: non-finite loss or gradient (run.nonfinite = "stop")' in out
    assert (run_dir / "metrics.jsonl").read_text().count('"step": 1,') == 1  # kept


def test_full_disk_when_checkpointing_keeps_the_previous_checkpoint(training_failures):
    run_dir, child = training_failures["disk_full"]
    status, out = _result(child)
    assert status == 2, out
    assert "Traceback" not in out
    expected = (
        f"error: could not write checkpoint {run_dir}/checkpoints/step_00000002: "
        f"{os.strerror(errno.ENOSPC)}"
    )
    assert expected in out and "the previous checkpoints are intact" in out
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000001"]
    assert load_file(str(checkpoints / "step_00000001" / "state.safetensors"))
    assert not list(checkpoints.glob(".tmp-*"))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [0, 1, 2]  # the records written before the failure are kept


def test_micro_batches_that_do_not_split_over_the_mesh_are_noted(
    capsys, monkeypatch, config, tmp_path
):
    """8 sequences in 4 micro-batches of 2 over data = 8 devices: each micro-batch is computed
    whole on every device, which a one-line note says at start-up (the run itself is valid)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")  # these runs are never finished
    for name in ("r", "s"):
        (tmp_path / name).mkdir()
    overrides = ["mesh.data=8", "algorithm.micro_batches=4", f"run.output_dir={tmp_path / 'r'}"]
    Trainer(load_config(config, overrides), tmp_path / "r")
    out = capsys.readouterr().out
    assert "note: micro-batches of 2 sequences do not split over mesh.data × mesh.fsdp = 8" in out
    Trainer(load_config(config, [f"run.output_dir={tmp_path / 's'}"]), tmp_path / "s")
    assert "note: micro-batches" not in capsys.readouterr().out
