# ruff: noqa: E402  (the environment is set before torch and transformers are imported)
# TRL 1.16 GRPOTrainer on gradflow's embedded default job (configs/grpo.toml), for a side-by-side
# measurement: the same shipped toy-arith checkpoint and character tokenizer, the same train/test
# problems (gradflow's generator and seeds), the same prompts in the same per-step order (gradflow's
# `prompt_indices` permutation, TRL's sampler unshuffled), the same reward (strict `#### N`
# correctness, weight 1; the default format weight is 0) and hyperparameters as close as TRL allows.
# Measures wall time (whole run and per step) and held-out greedy accuracy (500 test problems, HF
# `generate`, strict grading) before training and every `--eval-every` steps.
#
#   python benchmarks/trl_toy.py [--steps 60] [--eval-every 10] [--out result.json]
#
# Needs trl==1.16.0, torch (CPU) and gradflow installed (`pip install -e .` in the project): only
# gradflow's pure-Python task generator and grader are imported (no JAX).
import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

T_PROCESS = time.perf_counter()
LOAD_AT_START = os.getloadavg()
os.environ.update(
    HF_HUB_OFFLINE="1",
    WANDB_MODE="disabled",
    TOKENIZERS_PARALLELISM="false",
    TRL_EXPERIMENTAL_SILENCE="1",
)
warnings.filterwarnings("ignore")

import numpy as np
import torch

torch.set_num_threads(2)
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback
from transformers.utils import logging as hf_logging
from trl import GRPOConfig, GRPOTrainer

from gradflow.assets import ASSETS
from gradflow.rewards.gsm8k import is_correct
from gradflow.tasks.arithmetic import ArithmeticTask, generate, task_prompt

hf_logging.set_verbosity_error()
parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--eval-every", type=int, default=10)
parser.add_argument("--out", default="")
args = parser.parse_args()

# ---- configs/grpo.toml, as gradflow resolves it
SEED, TRAIN_SIZE, TEST_SIZE = 0, 20000, 500  # [run] seed; [task] train_size, test_size
PROMPTS, GROUP, MAX_NEW, TEMPERATURE = 32, 8, 32, 1.0  # [train] prompts_per_step; [algorithm]
LR, CLIP = 1e-4, 1.0
MODEL = ASSETS / "toy-arith"  # model.path = "gradflow:toy-arith"

task = ArithmeticTask()
train = generate(task, TRAIN_SIZE, seed=SEED, split="train")  # gradflow.task.build_task
test = generate(task, TEST_SIZE, seed=SEED + 1, split="test")


def prompt_indices(step: int, prompts: int, size: int, seed: int) -> np.ndarray:
    """gradflow.train.prompt_indices (copied: importing gradflow.train pulls in JAX)."""
    start, rows = step * prompts, []
    while len(rows) < prompts:
        epoch, offset = divmod(start + len(rows), size)
        order = np.random.default_rng([seed, epoch]).permutation(size)
        rows.extend(order[offset : offset + prompts - len(rows)].tolist())
    return np.asarray(rows, np.int32)


# The dataset in gradflow's step order: with shuffle_dataset=False TRL's RepeatSampler hands out
# rows in order, 32 prompts x 8 per step, so step i trains on exactly gradflow's step-i prompts.
order = np.concatenate([prompt_indices(s, PROMPTS, TRAIN_SIZE, SEED) for s in range(args.steps)])
dataset = Dataset.from_list(
    [{"prompt": task_prompt(train[i].question), "answer": train[i].answer} for i in order]
)


def correct(completions, answer, **kwargs):
    """gradflow's `correct` reward (rewards.text.correctness("strict")) on TRL's decoded text."""
    return [
        float(is_correct(c, a, mode="strict")) for c, a in zip(completions, answer, strict=True)
    ]


tokenizer = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
test_prompts = tokenizer(
    [task_prompt(p.question) for p in test],
    return_tensors="pt",
    padding=True,
    padding_side="left",
    add_special_tokens=False,
)
greedy = GenerationConfig(
    do_sample=False,
    max_new_tokens=MAX_NEW,
    pad_token_id=tokenizer.pad_token_id,
    eos_token_id=tokenizer.eos_token_id,
    temperature=None,
    top_p=None,
    top_k=None,
)


def evaluate(m) -> float:
    """Greedy accuracy on the 500 test problems, strict grading (gradflow.evaluate's eval/accuracy)."""
    was_training = m.training
    m.eval()
    with torch.no_grad():
        out = m.generate(**test_prompts, generation_config=greedy)
    m.train(was_training)
    texts = tokenizer.batch_decode(
        out[:, test_prompts["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return float(
        np.mean([is_correct(t, p.answer, mode="strict") for t, p in zip(texts, test, strict=True)])
    )


class Measure(TrainerCallback):
    """Per-step wall time (on_step_begin to on_step_end: generation, reward, loss, backward, AdamW)
    and held-out accuracy at step 0 and every `eval_every` steps (timed apart from the steps)."""

    def __init__(self):
        self.step_s, self.acc, self.eval_s = [], {}, 0.0

    def _eval(self, step, m):
        t = time.perf_counter()
        self.acc[step] = evaluate(m)
        self.eval_s += time.perf_counter() - t
        print(f"step {step}: eval/accuracy {self.acc[step]:.3f}", flush=True)

    def on_train_begin(self, a, state, control, model=None, **kw):
        self._eval(0, model)

    def on_step_begin(self, a, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, a, state, control, model=None, **kw):
        self.step_s.append(time.perf_counter() - self.t)
        if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
            self._eval(state.global_step, model)


config = GRPOConfig(
    output_dir=tempfile.mkdtemp(prefix="trl-toy-"),
    seed=SEED,
    max_steps=args.steps,
    per_device_train_batch_size=PROMPTS * GROUP,
    gradient_accumulation_steps=1,
    num_generations=GROUP,
    max_completion_length=MAX_NEW,
    temperature=TEMPERATURE,
    top_p=1.0,
    top_k=0,
    shuffle_dataset=False,
    # GRPO preset with kl_coef 0: no reference model; PolicyLoss defaults: token-mean over the whole
    # batch (TRL "dapo", one process, no accumulation), clip 0.2/0.2, 1 epoch x 1 minibatch.
    beta=0.0,
    loss_type="dapo",
    epsilon=0.2,
    num_iterations=1,
    scale_rewards="group",
    mask_truncated_completions=False,
    # gradflow Optimizer: AdamW(b1 .9, b2 .999, eps 1e-8, no weight decay), constant lr, no warmup,
    # global-norm clip 1.
    learning_rate=LR,
    lr_scheduler_type="constant",
    warmup_steps=0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    weight_decay=0.0,
    max_grad_norm=CLIP,
    # float32 on CPU, no remat (TRL's GRPOConfig defaults are bf16=True, gradient_checkpointing=True).
    use_cpu=True,
    bf16=False,
    fp16=False,
    gradient_checkpointing=False,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
)
measure = Measure()
trainer = GRPOTrainer(
    model=model,
    reward_funcs=correct,
    args=config,
    train_dataset=dataset,
    processing_class=tokenizer,
    callbacks=[measure],
)
t_train = time.perf_counter()
trainer.train()
train_s = time.perf_counter() - t_train
steps = measure.step_s
rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
result = {
    "implementation": f"TRL {trl.__version__} GRPOTrainer (transformers {transformers.__version__}, "
    f"torch {torch.__version__}, {torch.get_num_threads()} threads)",
    "steps": len(steps),
    "accuracy": {str(k): v for k, v in sorted(measure.acc.items())},
    "wall_s_process": time.perf_counter() - T_PROCESS,  # imports, model load, train() and its evals
    "wall_s_train": train_s,  # trainer.train(), evals included
    "eval_s_total": measure.eval_s,
    "step_s_mean": statistics.mean(steps),
    "step_s_median": statistics.median(steps),
    "step_s_first": steps[0],
    "step_s": steps,
    "reward_mean": rewards,
    "load_average_at_start": LOAD_AT_START,
}
print(json.dumps({k: v for k, v in result.items() if k not in ("step_s", "reward_mean")}, indent=1))
if args.out:
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
