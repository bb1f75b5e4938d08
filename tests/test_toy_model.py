"""The shipped default base model (`gradflow/assets/toy-arith`) and the SFT pipeline that makes it.

The checkpoint is compared against HF transformers (torch, float32): `AutoModelForCausalLM` and
`AutoTokenizer` load it from the directory alone, and its logits match `gradflow.models.load_hf`.
A tiny `run_sft` writes a checkpoint that both load.
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gradflow.assets import ASSETS
from gradflow.config import ConfigError
from gradflow.models import load_hf
from gradflow.sft import build_sft_config, evaluate, run_sft
from gradflow.tasks import ArithmeticTask, build_tokenizer, generate, task_prompt

torch.set_num_threads(2)

TOY = ASSETS / "toy-arith"
ROOT = ASSETS.parents[2]


def _texts(n: int) -> list[str]:
    problems = generate(ArithmeticTask(), n, seed=5, split="test")
    texts = [task_prompt(p.question) for p in problems[: n // 2]]
    return texts + [task_prompt(p.question) + p.answer for p in problems[n // 2 :]]


def _max_relative_error(model_dir, texts: list[str]) -> float:
    """Largest |gradflow - HF| logit difference over the largest |HF| logit, on real tokens."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager"
    ).eval()
    batch = tokenizer(texts, padding=True, add_special_tokens=False)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    ours = np.asarray(load_hf(model_dir)(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)))
    errors, scales = [], []
    for row in range(len(texts)):
        real = mask[row] == 1
        with torch.no_grad():
            ref = hf(torch.as_tensor(ids[row : row + 1, real], dtype=torch.long)).logits[0].numpy()
        errors.append(np.abs(ours[row, real] - ref).max())
        scales.append(np.abs(ref).max())
    return float(max(errors) / max(scales))


def test_shipped_checkpoint_matches_transformers():
    assert _max_relative_error(TOY, _texts(6)) <= 1e-4
    size = sum(f.stat().st_size for f in TOY.iterdir())
    assert size < 5 * 1024**2
    config = json.loads((TOY / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] == len(build_tokenizer())


def test_shipped_tokenizer_loads_with_auto_tokenizer():
    # The directory's config.json says qwen2, so transformers may rebuild a Qwen2Tokenizer: it
    # must still tokenize one character per token, newlines included, exactly as build_tokenizer.
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOY)
    built = build_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == len(built)
    for text in _texts(20):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == built(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode([*ids, 1], skip_special_tokens=True) == text


def test_shipped_model_is_partially_competent():
    record = json.loads((TOY / "training.json").read_text())
    data = record["config"]["data"]
    problems = generate(ArithmeticTask(), data["eval_size"], seed=data["eval_seed"], split="test")
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOY)
    accuracy = evaluate(load_hf(TOY), tokenizer, problems, key=jax.random.key(0))
    assert 0.2 <= accuracy <= 0.45
    assert abs(accuracy - record["greedy_accuracy"]) <= 0.03
    assert "python pipelines/sft.py configs/toy_sft.toml" in (TOY / "README.md").read_text()


def test_run_sft_smoke(tmp_path):
    raw = {
        "run": {"seed": 1, "output_dir": str(tmp_path / "out")},
        "model": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "head_dim": 8,
        },
        "data": {"train_size": 64, "eval_size": 8},
        "train": {"max_steps": 3, "batch_size": 8, "log_every": 1},
        "optimizer": {"learning_rate": 1e-3},
        "eval": {"every": 2, "max_new_tokens": 8},
    }
    lines = []
    output = run_sft(build_sft_config(raw), log=lines.append)
    record = json.loads((output / "training.json").read_text())
    assert record["steps"] == 3 and [h["step"] for h in record["history"]] == [2, 3]
    assert any("loss" in line for line in lines)
    assert (output / "README.md").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(output)
    assert hf.config.hidden_size == 16 and hf.config.vocab_size == len(build_tokenizer())
    assert load_hf(output).config.num_layers == 1
    assert len(transformers.AutoTokenizer.from_pretrained(output)) == len(build_tokenizer())


def test_config_errors(capsys):
    with pytest.raises(
        ConfigError, match=r"did you mean 'max_steps'.*batch_size, direct_steps, log_every"
    ):
        build_sft_config({"run": {"output_dir": "x"}, "train": {"max_step": 3}})
    with pytest.raises(ConfigError, match="expected int"):
        build_sft_config({"run": {"output_dir": "x"}, "model": {"hidden_size": "96"}})
    with pytest.raises(ConfigError, match="output_dir"):
        build_sft_config({})
    with pytest.raises(ConfigError, match=r"eval.direct_every: must be > 0, got 0"):
        build_sft_config({"run": {"output_dir": "x"}, "eval": {"direct_every": 0}})
    with pytest.raises(ConfigError, match=r"data.direct_fraction: must be in \[0, 1\]"):
        build_sft_config({"run": {"output_dir": "x"}, "data": {"direct_fraction": 1.5}})

    spec = importlib.util.spec_from_file_location("sft_cli", ROOT / "pipelines" / "sft.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(ROOT / "configs" / "toy_sft.toml"), "optimizer.learning_rat=1"]) == 2
    assert cli.main(["no/such/config.toml"]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 2 and "learning_rate" in err[0] and "does not exist" in err[1]
