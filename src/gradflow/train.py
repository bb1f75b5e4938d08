"""The loop around `step`: data order, evaluation, checkpoints, logs, plots and the HF export.

The prompts of step `i` depend only on the seed and `i` (a fresh permutation of the train split
each epoch), and step `i` uses `fold_in(state.key, i)`: a run resumed from a checkpoint
continues exactly as if it had never stopped.
"""

import dataclasses
import json
import logging
import time
from datetime import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from . import algorithms
from .batch import Prompts
from .checkpoint import list_checkpoints, read_manifest, restore_checkpoint, save_checkpoint
from .config import Config
from .evaluate import evaluate
from .models import ModelConfig, init_from_config, load_hf, save_hf
from .plots import plot_curves
from .run_log import RunLogger
from .state import TrainState, init_state
from .step import step as rl_step
from .task import Task, build_task, resolve_path

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss with `run.nonfinite = "stop"`)."""


class AlreadyFinished(Exception):
    """Resuming a run that has already done all its steps."""


def prompt_indices(step: int, prompts: int, size: int, seed: int) -> np.ndarray:
    """The train-split rows used at `step`: consecutive slices of per-epoch permutations.

    **Arguments:**

    - `step`: the RL step.
    - `prompts`: prompts per step.
    - `size`: train-split size.
    - `seed`: the run seed.

    **Returns:**

    `prompts` row indices.
    """
    start = step * prompts
    rows = []
    while len(rows) < prompts:
        epoch, offset = divmod(start + len(rows), size)
        order = np.random.default_rng([seed, epoch]).permutation(size)
        rows.extend(order[offset : offset + prompts - len(rows)].tolist())
    return np.asarray(rows, np.int32)


def load_policy(config: Config):
    """The initial policy: a local HF checkpoint, or random weights of a config's shape.

    **Arguments:**

    - `config`: the run config.

    **Returns:**

    The `Decoder`.
    """
    mc = config.model
    dtype = jnp.dtype(mc.dtype)
    compute = mc.compute_dtype or mc.dtype
    if mc.init == "random":
        shape = ModelConfig.load(resolve_path(mc.config or mc.path))
        valid = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(mc.overrides) - valid)
        if unknown:
            raise ValueError(
                f"unknown model.overrides key {unknown[0]!r}; valid: {', '.join(sorted(valid))}"
            )
        shape = shape.replace(**mc.overrides)
        policy = init_from_config(shape, key=jax.random.key(config.run.seed), dtype=dtype)
    else:
        if mc.overrides:
            raise ValueError('model.overrides only applies with model.init = "random"')
        path = resolve_path(mc.path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"model.path {path} does not exist: download an HF model (e.g. "
                "`huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir DIR`) and set "
                "model.path = DIR"
            )
        policy = load_hf(path, dtype=dtype)
    return dataclasses.replace(policy, compute_dtype=jnp.dtype(compute).name, remat=mc.remat)


def _check_shapes(config: Config, task: Task, policy, max_new_tokens: int) -> None:
    vocab = policy.config.vocab_size
    if len(task.tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(task.tokenizer)} tokens but the model's vocabulary has "
            f"{vocab}: model and tokenizer do not match"
        )
    needed = max(task.train_prompts.prompt_len, task.test_prompts.prompt_len) + max_new_tokens
    if needed > policy.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({task.train_prompts.prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {policy.config.max_position_embeddings}"
        )


def run_directory(config: Config, config_name: str) -> Path:
    """`run.output_dir`, or `runs/<config>-<time>`.

    **Arguments:**

    - `config`: the run config.
    - `config_name`: the config file's stem.

    **Returns:**

    The run directory (created).
    """
    if config.run.output_dir:
        path = Path(config.run.output_dir)
    else:
        path = Path("runs") / f"{config_name}-{datetime.now():%Y%m%d-%H%M%S}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Trainer:
    """Holds what the loop needs; `run()` trains."""

    def __init__(self, config: Config, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.task = build_task(config)
        policy = load_policy(config)
        self.algorithm = algorithms.make(
            config.algorithm_name,
            reward=self.task.reward(),
            eos_token_ids=self.task.eos_token_ids,
            pad_token_id=self.task.pad_token_id,
            **config.hyperparameters,
        )
        self.max_new_tokens = self.algorithm.rollout.max_new_tokens
        _check_shapes(config, self.task, policy, self.max_new_tokens)
        self.state: TrainState = init_state(
            self.algorithm, policy, key=jax.random.key(config.run.seed)
        )
        self.checkpoints = run_dir / "checkpoints"
        self.start_step = 0
        resumed = None
        if config.run.resume:
            found = list_checkpoints(self.checkpoints)
            if found:
                manifest = read_manifest(found[-1])
                self.state = restore_checkpoint(found[-1], self.state)
                self.start_step = resumed = int(manifest["step"])
                print(f"resuming from {found[-1]} (step {self.start_step})")
            else:
                print(f"resume: no checkpoint in {self.checkpoints}, starting from step 0")
        if resumed is not None and resumed >= config.train.steps:
            raise AlreadyFinished(
                f"{run_dir} already finished {resumed} of {config.train.steps} steps; nothing to do"
            )
        (run_dir / "config.toml").write_text(config.to_toml())
        self.log = RunLogger(run_dir, config, resumed_step=resumed)

    def _prompts(self, step: int) -> Prompts:
        bank = self.task.train_prompts
        count = self.algorithm.rollout.prompts_to_sample(self.config.train.prompts_per_step)
        rows = prompt_indices(step, count, bank.ids.shape[0], self.config.run.seed)
        return Prompts(
            ids=jnp.asarray(bank.ids[rows]),
            mask=jnp.asarray(bank.mask[rows]),
            index=jnp.asarray(rows),
        )

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out evaluation of the current policy, logged at `step`.

        **Arguments:**

        - `step`: the RL step.

        **Returns:**

        The evaluation metrics.
        """
        ec = self.config.eval
        size = min(ec.size, len(self.task.test))
        bank = self.task.test_prompts
        start = time.perf_counter()
        metrics, records = evaluate(
            self.state.policy,
            self.task.tokenizer,
            self.task.test[:size],
            bank.ids[:size],
            bank.mask[:size],
            key=jax.random.fold_in(jax.random.key(self.config.run.seed + 1), step),
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=self.task.eos_token_ids,
            pad_token_id=self.task.pad_token_id,
            batch_size=min(ec.batch_size, size),
            samples=ec.samples,
            temperature=ec.temperature,
        )
        (self.run_dir / "eval").mkdir(exist_ok=True)
        with open(self.run_dir / "eval" / f"step_{step:06d}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        self.log.log(step, {**metrics, "time/eval_s": time.perf_counter() - start})
        plot_curves(self.log.history, self.run_dir / "curves.png", self.config.algorithm_name)
        return metrics

    def _checkpoint(self, step: int) -> None:
        save_checkpoint(
            self.checkpoints,
            self.state,
            step,
            {
                "data_position": step * self.config.train.prompts_per_step,
                "algorithm": self.config.algorithm_name,
            },
            keep=self.config.checkpoint.keep,
        )

    def _samples(self, step: int, metrics: dict) -> None:
        tokens, mask = np.asarray(metrics["samples/tokens"]), np.asarray(metrics["samples/mask"])
        index, reward = np.asarray(metrics["samples/prompt_index"]), metrics["samples/reward"]
        rows = []
        for i in range(tokens.shape[0]):
            rows.append(
                {
                    "prompt": self.task.train[int(index[i])].question,
                    "completion": self.task.tokenizer.decode(
                        tokens[i][mask[i]], skip_special_tokens=True
                    ),
                    "reward": float(np.asarray(reward)[i]),
                }
            )
        self.log.log_samples(step, rows)

    def run(self) -> dict[str, float]:
        """Trains from `start_step` to `train.steps`, evaluating and checkpointing on the way.

        **Returns:**

        The final evaluation metrics.
        """
        config = self.config
        steps = config.train.steps
        if self.start_step == 0:
            self.evaluate(0)
        bar = tqdm(
            range(self.start_step, steps),
            initial=self.start_step,
            total=steps,
            desc=config.algorithm_name,
            disable=not config.logging.progress,
            dynamic_ncols=True,
        )
        final = {}
        step = self.start_step
        try:
            for step in bar:
                start = time.perf_counter()
                key = jax.random.fold_in(self.state.key, step)
                self.state, metrics = rl_step(self.algorithm, self.state, self._prompts(step), key)
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - start
                scalars = {k: float(v) for k, v in metrics.items() if not k.startswith("samples/")}
                scalars["time/step_s"] = elapsed
                scalars["throughput/tokens_per_s"] = scalars["completion/tokens"] / elapsed
                done = step + 1
                if scalars["update/skipped"] > 0:
                    message = f"step {done}: non-finite loss or gradient"
                    if config.run.nonfinite == "stop":
                        raise TrainingError(message + ' (run.nonfinite = "stop")')
                    print(message + ": update skipped")
                self.log.log(done, scalars)
                if config.logging.samples_every and done % config.logging.samples_every == 0:
                    self._samples(done, metrics)
                bar.set_postfix(
                    reward=f"{scalars['reward/mean']:.3f}",
                    acc=f"{scalars.get('train/accuracy', float('nan')):.2f}",
                    tok_s=f"{scalars['throughput/tokens_per_s']:.0f}",
                )
                if config.eval.every and done % config.eval.every == 0 and done < steps:
                    final = self.evaluate(done)
                if config.checkpoint.every and done % config.checkpoint.every == 0 and done < steps:
                    self._checkpoint(done)
        except KeyboardInterrupt:
            bar.close()
            completed = int(self.state.step)
            self._checkpoint(completed)
            self.log.finish()
            print(f"interrupted: checkpoint of step {completed} saved in {self.checkpoints}")
            raise
        bar.close()
        final = self.evaluate(steps)
        self._checkpoint(steps)
        export = self.run_dir / "hf"
        save_hf(self.state.policy, export)
        self.task.tokenizer.save_pretrained(export)
        self.log.finish()
        return final


def train(config: Config, *, config_name: str = "run") -> tuple[Path, dict[str, float]]:
    """Runs a whole training job.

    **Arguments:**

    - `config`: the run config.
    - `config_name`: names the default run directory.

    **Returns:**

    `(run_dir, final evaluation metrics)`.
    """
    run_dir = run_directory(config, config_name)
    trainer = Trainer(config, run_dir)
    return run_dir, trainer.run()
