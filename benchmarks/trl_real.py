# ruff: noqa: E402  (the environment is set before torch and transformers are imported)
# TRL 1.16 GRPOTrainer with a peft LoRA on configs/examples/smollm2_arithmetic.toml's job, for a
# side-by-side measurement: SmolLM2-135M-Instruct read by transformers from the same GGUF file
# (dequantized to float32), the same train/test problems (gradflow's generator and seeds), the same
# chat prompts (system + question + instruction, through the same chat template) in the same
# per-step order, the same reward (flexible correctness) and hyperparameters as close as TRL
# allows: 8 prompts × 8 samples × 24 new tokens, T = 1, LoRA r = 16, α = 32 on all linear layers,
# lr 2e-4 constant, clip 1, β = 0, token-mean loss, float32, gradient checkpointing (gradflow's
# model.remat = "full"). Held-out greedy accuracy (HF `generate`, flexible grading) before training
# and after the last step.
#
#   python benchmarks/trl_real.py --gguf FILE [--steps 6] [--out result.json]
#
# Needs the bench extra (trl==1.16.0, torch) and gguf; imports only gradflow's pure-Python task
# generator and grader (no JAX).
import argparse
import json
import os
import statistics
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

T_PROCESS = time.perf_counter()
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
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback
from transformers.utils import logging as hf_logging
from trl import GRPOConfig, GRPOTrainer

from gradflow.rewards.gsm8k import is_correct
from gradflow.tasks.arithmetic import ArithmeticTask, generate
from gradflow.tasks.prompts import DEFAULT_SYSTEM

hf_logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent
parser = argparse.ArgumentParser()
parser.add_argument("--gguf", required=True, help="the SmolLM2 GGUF file")
parser.add_argument("--config", default=str(ROOT / "configs/examples/smollm2_arithmetic.toml"))
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--out", default="")
args = parser.parse_args()

# ---- the gradflow config, as gradflow resolves it
config = tomllib.loads(Path(args.config).read_text())
tc, ac, lc = config["task"], config["algorithm"], config["model"]["lora"]
SEED = config["run"]["seed"]
PROMPTS, GROUP = config["train"]["prompts_per_step"], ac["group_size"]
MAX_NEW, TEMPERATURE, LR = ac["max_new_tokens"], ac["temperature"], ac["learning_rate"]
EVAL_SIZE = config["eval"]["size"]
task = ArithmeticTask(
    num_operands=tuple(tc["num_operands"]), max_value=tc["max_value"], operators=tc["operators"]
)
train = generate(task, tc["train_size"], seed=SEED, split="train")  # gradflow.task.build_task
test = generate(task, tc["test_size"], seed=SEED + 1, split="test")[:EVAL_SIZE]


def messages(question: str) -> list[dict]:
    """gradflow.tasks.prompts.chat_prompt's messages."""
    return [
        {"role": "system", "content": DEFAULT_SYSTEM},
        {"role": "user", "content": f"{question}\n{tc['instruction']}"},
    ]


def prompt_indices(step: int, prompts: int, size: int, seed: int) -> np.ndarray:
    """gradflow.train.prompt_indices (copied: importing gradflow.train pulls in JAX)."""
    start, rows = step * prompts, []
    while len(rows) < prompts:
        epoch, offset = divmod(start + len(rows), size)
        order = np.random.default_rng([seed, epoch]).permutation(size)
        rows.extend(order[offset : offset + prompts - len(rows)].tolist())
    return np.asarray(rows, np.int32)


order = np.concatenate([prompt_indices(s, PROMPTS, len(train), SEED) for s in range(args.steps)])
dataset = Dataset.from_list(
    [{"prompt": messages(train[i].question), "answer": train[i].answer} for i in order]
)


def correct(completions, answer, **kwargs):
    """gradflow's `correct` reward, flexible grading, on TRL's decoded text."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(is_correct(t, a, mode="flexible")) for t, a in zip(texts, answer, strict=True)]


gguf = Path(args.gguf)
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
# transformers refuses to train a model that carries its GGUF quantization_config: the float32
# weights it dequantized are saved as a plain HF checkpoint and read back.
converted = Path(tempfile.mkdtemp(prefix="trl-real-model-"))
dequantized = AutoModelForCausalLM.from_pretrained(
    gguf.parent, gguf_file=gguf.name, dtype=torch.float32
)
dequantized.hf_quantizer = None
del dequantized.config.quantization_config
dequantized.save_pretrained(converted)
del dequantized
model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
test_prompts = tokenizer(
    [
        tokenizer.apply_chat_template(
            messages(p.question), tokenize=False, add_generation_prompt=True
        )
        for p in test
    ],
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
    """Greedy flexible accuracy on the held-out problems (gradflow's eval/accuracy_flexible)."""
    was_training = m.training
    m.eval()
    with torch.no_grad():
        out = m.generate(**test_prompts, generation_config=greedy)
    m.train(was_training)
    texts = tokenizer.batch_decode(
        out[:, test_prompts["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return float(
        np.mean(
            [is_correct(t, p.answer, mode="flexible") for t, p in zip(texts, test, strict=True)]
        )
    )


class Measure(TrainerCallback):
    """Per-step wall time and training reward; held-out accuracy before and after."""

    def __init__(self):
        self.step_s, self.acc, self.reward = [], {}, []

    def on_train_begin(self, a, state, control, model=None, **kw):
        self.acc[0] = evaluate(model)
        print(f"step 0: eval/accuracy_flexible {self.acc[0]:.3f}", flush=True)

    def on_step_begin(self, a, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, a, state, control, model=None, **kw):
        self.step_s.append(time.perf_counter() - self.t)
        print(f"step {state.global_step}: {self.step_s[-1]:.1f} s", flush=True)
        if state.global_step == args.steps:
            self.acc[args.steps] = evaluate(model)

    def on_log(self, a, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            self.reward.append(logs["reward"])


grpo = GRPOConfig(
    output_dir=tempfile.mkdtemp(prefix="trl-real-"),
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
    beta=0.0,
    loss_type="dapo",
    epsilon=0.2,
    num_iterations=1,
    scale_rewards="group",
    mask_truncated_completions=False,
    learning_rate=LR,
    lr_scheduler_type="constant",
    warmup_steps=0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    weight_decay=0.0,
    max_grad_norm=ac["grad_clip"],
    use_cpu=True,
    bf16=False,
    fp16=False,
    gradient_checkpointing=True,
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
    args=grpo,
    train_dataset=dataset,
    processing_class=tokenizer,
    peft_config=LoraConfig(
        r=lc["rank"], lora_alpha=lc["alpha"], target_modules="all-linear", task_type="CAUSAL_LM"
    ),
    callbacks=[measure],
)
trainer.train()
result = {
    "implementation": f"TRL {trl.__version__} (torch {torch.__version__})",
    "steps": args.steps,
    "step_s": measure.step_s,
    "steady_step_s": statistics.median(measure.step_s[1:]),
    "reward": measure.reward,
    "accuracy": {str(k): v for k, v in measure.acc.items()},
    "process_s": time.perf_counter() - T_PROCESS,
}
print(json.dumps(result))
if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
