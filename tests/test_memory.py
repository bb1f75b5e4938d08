"""Memory planning (`gradflow.memory`): `model.remat = "auto"` and an unset
`algorithm.micro_batches` are chosen from the compiled step's own memory against the memory
free, and an out-of-memory error ends a run in one line.

The plan's order and refusals are checked with stand-in measurements; the measurement itself on
the compiled step of a small model (checkpointing and micro-batches lower it); a run whose
budget is cut to between two candidates takes the one that fits and trains; and a run that
runs out of memory for real prints one line naming the keys."""

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from child_run import ROOT, tiny_config

from gradflow import memory
from gradflow.config import load_config
from gradflow.memory import MemoryPlanError, out_of_memory_message, plan_memory
from gradflow.models import Decoder
from gradflow.step import step
from gradflow.train import Trainer, run_directory, with_remat

SHAPE = SimpleNamespace(  # the fields activation_estimate reads
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


def _measured(sizes: dict):
    """A stand-in for `lower`: each candidate's compiled step needs `sizes[candidate]` bytes."""
    tried = []

    def lower(remat, micro_batches):
        tried.append((remat, micro_batches))
        analysis = SimpleNamespace(
            temp_size_in_bytes=sizes[remat, micro_batches],
            output_size_in_bytes=10,
            alias_size_in_bytes=10,
        )
        compiled = SimpleNamespace(memory_analysis=lambda: analysis)
        return SimpleNamespace(compile=lambda: compiled)

    return lower, tried


def test_the_plan_takes_the_first_candidate_that_fits(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes_per_device", lambda: 1000)
    sizes = {("none", 1): 900, ("full", 1): 850, ("full", 2): 790, ("full", 4): 300}
    lower, tried = _measured(sizes)
    plan = plan_memory(lower, SHAPE, remat="auto", micro_batches=None, rows=4, length=10**4)
    assert (plan.remat, plan.micro_batches, plan.step_bytes) == ("full", 2, 790)
    assert tried == [("none", 1), ("full", 1), ("full", 2)]
    assert "model.remat = 'full', algorithm.micro_batches = 2" in plan.describe()
    # What the user set stays: only the open key varies.
    lower, tried = _measured(sizes | {("none", 2): 700, ("none", 4): 100})
    plan = plan_memory(lower, SHAPE, remat="none", micro_batches=None, rows=4, length=10**4)
    assert (plan.remat, plan.micro_batches) == ("none", 2)
    lower, tried = _measured(sizes | {("none", 4): 1200})
    plan = plan_memory(lower, SHAPE, remat="auto", micro_batches=4, rows=4, length=10**4)
    assert (plan.remat, plan.micro_batches) == ("full", 4)
    assert tried == [("none", 4), ("full", 4)]


def test_nothing_fits_names_the_keys(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes_per_device", lambda: 1000)
    lower, tried = _measured({("none", 1): 5000, ("full", 1): 4000, ("full", 2): 3000})
    with pytest.raises(MemoryPlanError, match="train.prompts_per_step") as error:
        plan_memory(lower, SHAPE, remat="auto", micro_batches=None, rows=2, length=10**4)
    assert "\n" not in str(error.value)
    assert 'with model.remat = "full" and algorithm.micro_batches = 2' in str(error.value)
    assert tried == [("none", 1), ("full", 1), ("full", 2)]


def test_a_small_model_is_not_compiled_to_plan(monkeypatch):
    """Far under the budget, the activation estimate decides without compiling."""
    monkeypatch.setattr(memory, "free_bytes_per_device", lambda: 2**34)
    lower, tried = _measured({})
    plan = plan_memory(lower, SHAPE, remat="auto", micro_batches=None, rows=64, length=128)
    assert (plan.remat, plan.micro_batches, plan.step_bytes, tried) == ("none", 1, None, [])


def test_the_plan_measures_the_compiled_step(tmp_path, monkeypatch):
    """What XLA allocates for the step without checkpointing is under the estimate over
    `QUICK_SHARE` (so trusting the estimate far under the budget is safe), and the compiled step's own memory falls with
    checkpointing and with micro-batches, which is what the plan relies on."""
    config = load_config(_config(tmp_path, steps=1))
    trainer = Trainer(config, run_directory(config, "memory"))
    prompts, key = trainer._prompts(0), jax.random.key(0)
    from gradflow.step import lower_step

    def needed(remat, micro_batches):
        loss = dataclasses.replace(trainer.algorithm.loss, micro_batches=micro_batches)
        algorithm = dataclasses.replace(trainer.algorithm, loss=loss)
        state = with_remat(trainer.state, remat)
        lowered = lower_step(algorithm, state, prompts, key, mesh=trainer.mesh)
        return memory._step_bytes(lowered.compile())

    rows = config.train.prompts_per_step * trainer.algorithm.rollout.group_size
    length = trainer.task.train_prompts.ids.shape[1] + trainer.algorithm.rollout.max_new_tokens
    plain, remat, split = needed("none", 1), needed("full", 1), needed("full", 4)
    estimate = memory.activation_estimate(trainer.state.policy.config, rows, length)
    assert plain < estimate / memory.QUICK_SHARE  # trusting the estimate under QUICK_SHARE is safe
    assert split < remat < plain
    assert (trainer.algorithm.loss.micro_batches, trainer.state.policy.remat) == (1, "none")
    trainer.task.close()
    # A budget between what 2 and 4 micro-batches need: the run plans 4 and trains.
    budget = (needed("full", 2) + split) // 2
    free = int(budget / memory.BUDGET_SHARE) + 1
    monkeypatch.setattr(memory, "free_bytes_per_device", lambda: free)
    trainer = Trainer(config, run_directory(config, "memory"))
    assert (trainer.algorithm.loss.micro_batches, trainer.state.policy.remat) == (4, "full")
    final = trainer.run()
    assert 0.0 <= final["eval/accuracy"] <= 1.0


def test_an_out_of_memory_ends_in_one_line(tmp_path):
    """A run whose model does not fit the machine (a 2^36-token vocabulary: terabytes) ends
    with one line naming the keys, not a traceback."""
    config = _config(tmp_path)
    overrides = "model.overrides.vocab_size=68719476736"
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "run.py"), str(config), overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("error: out of memory (Out of memory allocating")
    assert 'model.remat = "full"' in lines[0] and "algorithm.micro_batches" in lines[0]
    assert out_of_memory_message(ValueError("shapes do not match")) is None


def _config(tmp_path, **train):
    return tiny_config(
        tmp_path, tmp_path / "run", train={"steps": 2, "prompts_per_step": 8, **train}
    )


def test_with_remat_changes_every_model_of_a_lora_state(tmp_path):
    """A LoRA state's optimizer holds Decoder-shaped trees with nothing where the base is
    frozen: the setting changes there too, and the step runs under it."""
    config = load_config(
        tiny_config(
            tmp_path,
            tmp_path / "run",
            model={"lora": {"rank": 2, "alpha": 4}},
            train={"steps": 1, "prompts_per_step": 8},
        )
    )
    trainer = Trainer(config, run_directory(config, "lora"))
    state = with_remat(trainer.state, "full")
    decoders = jax.tree.leaves(state, is_leaf=lambda node: isinstance(node, Decoder))
    remats = {node.remat for node in decoders if isinstance(node, Decoder)}
    assert remats == {"full"} and len([d for d in decoders if isinstance(d, Decoder)]) > 1
    state, metrics = step(
        trainer.algorithm, state, trainer._prompts(0), jax.random.key(0), mesh=trainer.mesh
    )
    assert state.policy.remat == "full" and bool(jnp.isfinite(metrics["loss/total"]))
    trainer.task.close()
