"""The loop around `step`: data order, evaluation, checkpoints, logs, plots and the HF export.

The prompts of step `i` depend only on the seed and `i` (a fresh permutation of the train split
each epoch), and step `i` uses `fold_in(state.key, i)`: a run resumed from a checkpoint
continues exactly as if it had never stopped.

Every run uses a mesh over all devices (`[mesh]`, `gradflow.sharding`). With several processes
(`jax.distributed`) every process runs this same loop on the same prompts and process 0 alone
writes the run directory (metrics, W&B, evaluations, checkpoints, the HF export; with LoRA also
the PEFT adapter in `adapter/`, and checkpoints without the frozen base). Ctrl-C ends
the step in flight, saves a checkpoint and exits with status 130 (a second Ctrl-C stops at once).
"""

import copy
import dataclasses
import json
import logging
import shutil
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from . import algorithms, resume
from .algorithms import Algorithm
from .assets import resolve_path
from .batch import Prompts
from .checkpoint import (
    read_manifest,
    restore_checkpoint,
    save_checkpoint,
    to_host,
)
from .compilation_cache import enable_compilation_cache
from .config import Config, ConfigError
from .evaluate import evaluate, evaluation_turns
from .memory import as_remat, plan_memory
from .models import (
    Decoder,
    ModelConfig,
    base_fingerprint,
    init_from_config,
    load_hf,
    lora_policy,
    save_hf,
    save_peft,
)
from .models.config import OverrideError
from .models.gguf_io import gguf_hf_config, is_gguf, load_gguf, resolve_model_path
from .plots import plot_curves
from .run_log import RunLogger
from .sharding import batch_size_divisor, check_batch, make_mesh, shard_prompts, shard_state
from .state import TrainState, init_state
from .step import lower_step
from .step import step as rl_step
from .tasks.task import Task, build_task, model_directory

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss with `run.nonfinite = "stop"`)."""


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
    """The initial policy: a local HF checkpoint or GGUF file, or random weights of a config's
    shape, with LoRA adapters when `[model.lora]` asks for them (fresh, or a PEFT adapter's).

    **Arguments:**

    - `config`: the run config.

    **Returns:**

    The `Decoder`.
    """
    mc = config.model
    dtype = jnp.dtype(mc.dtype)
    compute = mc.compute_dtype or mc.dtype
    if mc.init == "random":
        source = resolve_model_path(mc.config or mc.path)
        try:
            shape = ModelConfig.load(
                gguf_hf_config(source) if is_gguf(source) else source, mc.overrides
            )
        except OverrideError as e:
            raise ConfigError(f"model.overrides: {e}") from None
        policy = init_from_config(shape, key=jax.random.key(config.run.seed), dtype=dtype)
    else:
        if mc.overrides:
            raise ValueError('model.overrides only applies with model.init = "random"')
        path = model_directory(mc.path)
        policy = load_gguf(path, dtype=dtype) if is_gguf(path) else load_hf(path, dtype=dtype)
    if mc.lora is not None:
        policy = lora_policy(
            policy,
            rank=mc.lora.rank,
            alpha=mc.lora.alpha,
            targets=mc.lora.targets,
            dropout=mc.lora.dropout,
            adapter=resolve_path(mc.lora.adapter) if mc.lora.adapter else None,
            key=jax.random.fold_in(jax.random.key(config.run.seed), 1),
        )
    return dataclasses.replace(
        policy,
        compute_dtype=jnp.dtype(compute).name,
        remat=as_remat(mc.remat),
        scan_layers=mc.scan_layers,
    )


def _check_shapes(config: Config, task: Task, policy, max_new_tokens: int) -> None:
    vocab = policy.config.vocab_size
    if len(task.tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(task.tokenizer)} tokens but the model's vocabulary has "
            f"{vocab}: model and tokenizer do not match"
        )
    prompt = max(task.train_prompts.prompt_len, task.test_prompts.prompt_len)
    context = policy.config.max_position_embeddings
    if prompt + max_new_tokens <= context:
        return
    env = config.environment
    if env.class_:  # the completion width is the [environment] keys' trajectory
        budget = (
            "environment.max_turns × (environment.max_turn_tokens + "
            f"environment.max_observation_tokens) = {prompt} + {env.max_turns} × "
            f"({env.max_turn_tokens} + {env.max_observation_tokens})"
        )
        fix = "lower those"
    else:
        budget = f"algorithm.max_new_tokens ({max_new_tokens})"
        fix = "lower algorithm.max_new_tokens"
    raise ValueError(
        f"prompt ({prompt} tokens) + {budget} = {prompt + max_new_tokens} tokens exceeds the "
        f"model's context of {context}: {fix}, or use shorter prompts or a model with a longer "
        "context"
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
    elif config.run.resume:
        raise ConfigError("run.resume = true needs run.output_dir: the run directory to continue")
    elif jax.process_count() > 1:  # each process would stamp its own time
        raise ConfigError(
            "a multi-process run needs run.output_dir (on a file system every host sees)"
        )
    else:
        path = Path("runs") / f"{config_name}-{datetime.now():%Y%m%d-%H%M%S}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.output_dir {path} is a file: pass a directory")
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
    return path


def build_algorithm(config: Config, task: Task) -> Algorithm:
    """The configured preset with the task's reward and tokens; with `[environment]` its
    multi-turn form (`algorithms.multi_turn`).

    **Arguments:**

    - `config`: the run config.
    - `task`: the task.

    **Returns:**

    The `Algorithm`.
    """
    reward = task.reward()
    algorithm = algorithms.make(
        config.algorithm_name,
        reward=reward,
        eos_token_ids=task.eos_token_ids,
        pad_token_id=task.pad_token_id,
        **config.hyperparameters,
    )
    env = config.environment
    if env.class_:
        try:
            algorithm = algorithms.multi_turn(
                algorithm,
                task.episodes(task.train, env.max_observation_tokens),
                max_turns=env.max_turns,
                max_turn_tokens=env.max_turn_tokens,
                max_observation_tokens=env.max_observation_tokens,
            )
        except ValueError as e:
            raise ConfigError(
                f"[environment] with algorithm {config.algorithm_name}: {e}"
            ) from None
    metric = getattr(algorithm.rollout, "metric", None)  # dynamic sampling judges groups by it
    if metric is not None and metric not in (*reward.parts, "overlong_penalty"):
        raise ConfigError(
            f"algorithm.dynamic_sampling_metric = {metric!r} is not a reward part of this task "
            f"(its parts: {', '.join(reward.parts)}); name one, or name a [[reward]] {metric!r}"
        )
    return algorithm


def check_layout(config: Config, task: Task, policy, algorithm: Algorithm, mesh, say) -> None:
    """Checks that the model, the prompts and the batch fit together and over the mesh.

    **Arguments:**

    - `config`: the run config.
    - `task`: the task.
    - `policy`: the initial policy.
    - `algorithm`: the algorithm.
    - `mesh`: the device mesh.
    - `say`: prints a note (micro-batches that do not split over the devices).

    **Returns:**

    Nothing.
    """
    _check_shapes(config, task, policy, algorithm.rollout.max_new_tokens)
    check_batch(config.train.prompts_per_step, algorithm.rollout.group_size, mesh)
    loss = algorithm.loss
    rows = config.train.prompts_per_step * algorithm.rollout.group_size
    if rows % (loss.minibatches * loss.micro_batches):
        raise ConfigError(
            f"train.prompts_per_step × algorithm.group_size = {rows} sequences do not divide "
            f"into algorithm.minibatches × algorithm.micro_batches = {loss.minibatches} × "
            f"{loss.micro_batches}"
        )
    per_micro_batch = rows // (loss.minibatches * loss.micro_batches)
    shards = batch_size_divisor(mesh)
    if per_micro_batch % shards:
        say(
            f"note: micro-batches of {per_micro_batch} sequences do not split over "
            f"mesh.data × mesh.fsdp = {shards} devices, so every device computes each of them "
            "whole; fewer algorithm.minibatches × algorithm.micro_batches avoid that"
        )


def with_remat(state: TrainState, remat: str) -> TrainState:
    """The state with every model in it (the policy, a critic's backbone, a reference, and the
    optimizer states shaped like them) checkpointing its layers as `remat` says.

    **Arguments:**

    - `state`: the train state.
    - `remat`: `"none"`, `"full"` or `"dots"`.

    **Returns:**

    The same arrays under the new setting.
    """

    def one(node):
        if not isinstance(node, Decoder):
            return node
        # Set on a copy rather than through __init__: the optimizer states' Decoder-shaped trees
        # hold None where nothing is trained, which the constructor's type checks refuse.
        changed = copy.copy(node)
        object.__setattr__(changed, "remat", remat)
        return changed

    return jax.tree.map(one, state, is_leaf=lambda node: isinstance(node, Decoder))


def build_state(
    config: Config, algorithm: Algorithm, policy, mesh, start: resume.Resume
) -> TrainState:
    """The train state laid out over the mesh, restored from the checkpoint a resume names.

    **Arguments:**

    - `config`: the run config.
    - `algorithm`: the algorithm.
    - `policy`: the initial policy.
    - `mesh`: the device mesh.
    - `start`: where the run starts.

    **Returns:**

    The `TrainState`.
    """
    policy = shard_state(policy, mesh)
    state = init_state(algorithm, policy, key=jax.random.key(config.run.seed))
    state = shard_state(state, mesh)
    if not start.resumed:
        return state
    # A LoRA checkpoint holds the adapters, not the frozen base: the base it was trained on must
    # be the one loaded now.
    saved, loaded = (
        read_manifest(start.checkpoint).get("base_fingerprint"),
        _base_fingerprint(state),
    )
    if saved != loaded:
        raise ConfigError(
            f"run.resume: {start.checkpoint} was trained on a base model with fingerprint "
            f"{saved}, the base loaded now has {loaded}; resume on the same model.path weights"
        )
    return state.with_trained(restore_checkpoint(start.checkpoint, state.trained()))


def _base_fingerprint(state: TrainState) -> str | None:
    """The fingerprint of a LoRA policy's frozen base (`None` without adapters)."""
    if state.policy.lora is None:
        return None
    return base_fingerprint(state.policy.adapters_off())


class Trainer:
    """Holds what the loop needs; `run()` trains."""

    def __init__(self, config: Config, run_dir: Path):
        self.config, self.run_dir = config, run_dir
        self.main_process = jax.process_index() == 0
        self.checkpoints = run_dir / "checkpoints"
        self.resume = resume.plan(config, run_dir)
        self.mesh = make_mesh(config.mesh)
        processes = jax.process_count()
        self._print(
            f"mesh {dict(self.mesh.shape)} over {self.mesh.size} devices "
            f"({processes} process{'es' if processes > 1 else ''})"
        )
        self.task = build_task(config)
        policy = load_policy(config)
        self.algorithm = build_algorithm(config, self.task)
        # The held-out rows' environments, built once (one compilation for every evaluation).
        held_out = self.task.test.head(min(config.eval.size, len(self.task.test)))
        self.eval_turns = evaluation_turns(self.task, held_out, config.environment)
        check_layout(config, self.task, policy, self.algorithm, self.mesh, self._print)
        self.state = build_state(config, self.algorithm, policy, self.mesh, self.resume)
        self.algorithm, self.state = self._plan_memory()
        self.base = _base_fingerprint(self.state)
        if self.resume.resumed:
            self._print(f"resuming from {self.resume.checkpoint} (step {self.resume.step})")
        elif config.run.resume:
            self._print(f"resume: no checkpoint in {self.checkpoints}, starting from step 0")
        if self.main_process:
            (run_dir / "config.toml").write_text(config.to_toml())
        resumed_step = self.resume.step if self.resume.resumed else None
        self.log = RunLogger(run_dir, config, resumed_step=resumed_step, write=self.main_process)
        self.interrupted = False

    def _plan_memory(self) -> tuple[Algorithm, TrainState]:
        """The algorithm and state with `model.remat = "auto"` and an unset
        `algorithm.micro_batches` sized from the memory free (`gradflow.memory`)."""
        remat = self.config.model.remat
        micro_batches = self.config.hyperparameters.get("micro_batches")
        if remat != "auto" and micro_batches is not None:
            return self.algorithm, self.state
        prompts, key = self._prompts(0), jax.random.key(0)

        def configured(remat: str, micro_batches: int) -> tuple[Algorithm, TrainState]:
            loss = dataclasses.replace(self.algorithm.loss, micro_batches=micro_batches)
            return dataclasses.replace(self.algorithm, loss=loss), with_remat(self.state, remat)

        def lower(remat: str, micro_batches: int):
            return lower_step(*configured(remat, micro_batches), prompts, key, mesh=self.mesh)

        loss, rollout = self.algorithm.loss, self.algorithm.rollout
        plan = plan_memory(
            lower,
            self.state.policy.config,
            remat=remat,
            micro_batches=micro_batches,
            rows=self.config.train.prompts_per_step * rollout.group_size // loss.minibatches,
            length=self.task.train_prompts.ids.shape[1] + rollout.max_new_tokens,
        )
        self._print(plan.describe())
        if (plan.remat, plan.micro_batches) == (self.state.policy.remat, loss.micro_batches):
            return self.algorithm, self.state
        return configured(plan.remat, plan.micro_batches)

    def _print(self, message: str) -> None:
        if self.main_process:
            print(message, flush=True)

    def _prompts(self, step: int) -> Prompts:
        bank = self.task.train_prompts
        count = self.algorithm.rollout.prompts_to_sample(self.config.train.prompts_per_step)
        rows = prompt_indices(step, count, bank.ids.shape[0], self.config.run.seed)
        prompts = Prompts(
            ids=jnp.asarray(bank.ids[rows]),
            mask=jnp.asarray(bank.mask[rows]),
            index=jnp.asarray(rows),
        )
        return shard_prompts(prompts, self.mesh)

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
            self.task,
            self.task.test.head(size),
            bank.ids[:size],
            bank.mask[:size],
            key=jax.random.fold_in(jax.random.key(self.config.run.seed + 1), step),
            max_new_tokens=self.algorithm.rollout.max_new_tokens,
            batch_size=min(ec.batch_size, size),
            samples=ec.samples,
            temperature=ec.temperature,
            mesh=self.mesh,
            turns=self.eval_turns,
        )
        self.log.log(step, {**metrics, "time/eval_s": time.perf_counter() - start})
        if self.main_process:
            (self.run_dir / "eval").mkdir(exist_ok=True)
            with open(self.run_dir / "eval" / f"step_{step:06d}.jsonl", "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in records)
            plot_curves(self.log.history, self.run_dir / "curves.png", self.config.algorithm_name)
        return metrics

    def _checkpoint(self, step: int) -> None:
        save_checkpoint(
            self.checkpoints,
            self.state.trained(),
            step,
            {"algorithm": self.config.algorithm_name, "base_fingerprint": self.base},
            keep=self.config.checkpoint.keep,
        )

    def _samples(self, step: int, metrics: dict) -> None:
        if not self.main_process:
            return
        tokens, mask = np.asarray(metrics["samples/tokens"]), np.asarray(metrics["samples/mask"])
        index, reward = np.asarray(metrics["samples/prompt_index"]), metrics["samples/reward"]
        rows = []
        for i in range(tokens.shape[0]):
            rows.append(
                {
                    "prompt": self.task.train.columns[self.task.prompt_key][int(index[i])],
                    "completion": self.task.tokenizer.decode(
                        tokens[i][mask[i]], skip_special_tokens=True
                    ),
                    "reward": float(np.asarray(reward)[i]),
                }
            )
        self.log.log_samples(step, rows)

    def _on_sigint(self, signum, frame) -> None:
        """The first Ctrl-C asks the loop to stop after the step in flight; a second one stops."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.interrupted = True
        self._print("interrupt: finishing the current step, then saving a checkpoint")

    def run(self) -> dict[str, float]:
        """Trains from the resumed step to `train.steps`, evaluating and checkpointing on the way.

        **Returns:**

        The final evaluation metrics.

        **Raises:**

        `KeyboardInterrupt` after Ctrl-C, once a checkpoint of the last completed step is saved.
        """
        handle_sigint = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if handle_sigint else None
        try:
            # The reward workers start in the background (seconds of imports), overlapping the
            # first compilations; they stop when the run ends, however it ends.
            self.task.scorer.start()
            return self._run()
        finally:
            self.task.close()
            if handle_sigint:
                signal.signal(signal.SIGINT, previous)

    def _stop_if_interrupted(self) -> None:
        if jax.process_count() > 1:  # a Ctrl-C seen by any process stops every process
            flags = multihost_utils.process_allgather(np.int32(self.interrupted))
            self.interrupted = bool(np.any(flags))
        if not self.interrupted:
            return
        completed = int(self.state.step)
        self._checkpoint(completed)
        self.log.finish()
        self._print(f"interrupted: checkpoint of step {completed} saved in {self.checkpoints}")
        raise KeyboardInterrupt

    def _run(self) -> dict[str, float]:
        config = self.config
        steps = config.train.steps
        if not self.resume.resumed:  # a resumed run logged eval@0 already
            self.evaluate(0)
        bar = tqdm(
            range(self.resume.step, steps),
            initial=self.resume.step,
            total=steps,
            desc=config.algorithm_name,
            disable=not (config.logging.progress and self.main_process),
            dynamic_ncols=True,
        )
        with bar:
            for step in bar:
                self._stop_if_interrupted()
                start = time.perf_counter()
                key = jax.random.fold_in(self.state.key, step)
                self.state, metrics = rl_step(
                    self.algorithm, self.state, self._prompts(step), key, mesh=self.mesh
                )
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - start
                scalars = {k: float(v) for k, v in metrics.items() if not k.startswith("samples/")}
                scalars["time/step_s"] = elapsed
                scalars["throughput/tokens_per_s"] = scalars["completion/tokens"] / elapsed
                done = step + 1
                self.log.log(done, scalars)
                if scalars["update/skipped"] > 0:
                    message = f"step {done}: non-finite loss or gradient"
                    if config.run.nonfinite == "stop":
                        raise TrainingError(message + ' (run.nonfinite = "stop")')
                    self._print(message + ': update skipped (run.nonfinite = "skip")')
                if config.logging.samples_every and done % config.logging.samples_every == 0:
                    self._samples(done, metrics)
                bar.set_postfix(
                    reward=f"{scalars['reward/mean']:.3f}",
                    acc=f"{scalars.get('train/accuracy', float('nan')):.2f}",
                    tok_s=f"{scalars['throughput/tokens_per_s']:.0f}",
                )
                if config.eval.every and done % config.eval.every == 0 and done < steps:
                    self.evaluate(done)
                if config.checkpoint.every and done % config.checkpoint.every == 0 and done < steps:
                    self._checkpoint(done)
        final = self.evaluate(steps)  # after the last step a Ctrl-C lets the run finish
        policy = jax.tree.map(to_host, self.state.policy)  # gathered on every process
        # The export comes before the last checkpoint: a crash between the two resumes from the
        # checkpoint before and exports again, instead of finding a finished run without export.
        if self.main_process:
            if policy.lora is not None:
                base = (
                    "" if config.model.init == "random" else str(model_directory(config.model.path))
                )
                save_peft(policy, self.run_dir / "adapter", base_model=base)
            export = self.run_dir / "hf"
            save_hf(policy, export)  # LoRA adapters merged
            self.task.tokenizer.save_pretrained(export)
            # The source model's generation defaults (its EOS list above all) go with it.
            source = resolve_path(config.model.path) if config.model.path else None
            if source is not None and (source / "generation_config.json").is_file():
                shutil.copy(source / "generation_config.json", export)
        self._checkpoint(steps)
        self.log.finish()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("gradflow: run finished")
        return final


def train(config: Config, *, config_name: str = "run") -> tuple[Path, dict[str, float]]:
    """Runs a whole training job.

    **Arguments:**

    - `config`: the run config.
    - `config_name`: names the default run directory.

    **Returns:**

    `(run_dir, final evaluation metrics)`.
    """
    enable_compilation_cache(config.run.compilation_cache)
    run_dir = run_directory(config, config_name)
    trainer = Trainer(config, run_dir)
    return run_dir, trainer.run()
