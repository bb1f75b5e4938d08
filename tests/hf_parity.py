"""Helpers for the tests that hold gradflow's decoder against HF transformers (torch, float32).

Used by `test_model.py` (Qwen2, Llama and the sampler) and `test_model_families.py` (Qwen3,
Mistral, Gemma 3): random tiny checkpoints written by `save_pretrained`, a left-padded prompt
batch, HF's logits and log-probs, and the three parity checks every family passes (logits,
`save_hf` round trip, greedy `generate`).
"""

import dataclasses
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from gradflow.models import Decoder, load_hf, save_hf
from gradflow.rollout import generate

torch.set_num_threads(2)

PROMPT_LENGTHS = (7, 3, 5, 1)  # a left-padded batch of different prompt lengths
PROMPT_WIDTH = max(PROMPT_LENGTHS)
NEW_TOKENS = 8
TINY = dict(
    vocab_size=64,
    num_hidden_layers=2,
    initializer_range=0.3,
    max_position_embeddings=128,
    attn_implementation="eager",
)
"""What every tiny test checkpoint shares: a 64-token vocabulary, two layers, eager attention."""
QWEN3_TIED = (
    transformers.Qwen3ForCausalLM,
    transformers.Qwen3Config(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        **TINY,
    ),
)
"""Qwen3 with GQA ratio 2, a tied head and an explicit `head_dim` (hidden / heads is 8)."""


@dataclasses.dataclass
class Checkpoint:
    hf: transformers.PreTrainedModel
    path: Path
    model: Decoder


def write_checkpoint(
    model_class: type, config: transformers.PretrainedConfig, path: Path, seed: int
) -> Checkpoint:
    """A random HF model saved with `save_pretrained` into `path`, and gradflow's load of it.

    Norm weights are drawn around the identity (1 for Qwen/Llama/Mistral, 0 for Gemma's
    `1 + weight`) and biases around 0, so that every tensor matters.
    """
    torch.manual_seed(seed)
    hf = model_class(config).eval()
    identity = 0.0 if config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.copy_(identity + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
    hf.save_pretrained(path)
    return Checkpoint(hf=hf, path=path, model=load_hf(path))


def left_padded_prompts(vocab: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids of `PROMPT_LENGTHS` tokens and their mask."""
    rng = np.random.default_rng(0)
    ids = np.zeros((len(PROMPT_LENGTHS), PROMPT_WIDTH), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        ids[row, PROMPT_WIDTH - length :] = rng.integers(0, vocab, length)
        mask[row, PROMPT_WIDTH - length :] = 1
    return ids, mask


@eqx.filter_jit
def forward(model, ids, mask):
    return model(ids, mask)


def gf_logits(model: Decoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def hf_logits(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HF logits of a left-padded batch; positions count real tokens, as HF generate does."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4):
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max |Δlogit| {err:.3g} > {rtol} × max |logit| {scale:.3g}"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def completion_logprobs(hf, prompt_ids, prompt_mask, tokens, mask) -> np.ndarray:
    """Log-probabilities (temperature 1, unfiltered) of each completion token under HF."""
    ids = np.concatenate([prompt_ids, tokens], axis=1)
    full_mask = np.concatenate([prompt_mask, mask.astype(np.int32)], axis=1)
    logp = log_softmax(hf_logits(hf, ids, full_mask))
    width = prompt_ids.shape[1]
    predicting = logp[:, width - 1 : -1]  # position t predicts token t + 1
    return np.take_along_axis(predicting, tokens[:, :, None], axis=-1)[:, :, 0]


def completion_logits(hf, prompt_ids, prompt_mask, tokens) -> np.ndarray:
    """HF next-token logits before each completion token (no EOS: every token is real)."""
    ids = np.concatenate([prompt_ids, tokens], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(tokens)], axis=1)
    return hf_logits(hf, ids, full_mask)[:, prompt_ids.shape[1] - 1 : -1]


def truncate_at_eos(row: np.ndarray, eos: int) -> np.ndarray:
    hits = np.flatnonzero(row == eos)
    return row if hits.size == 0 else row[: hits[0] + 1]


def check_completion_structure(completions, eos: int | None, pad: int, max_new: int):
    """Mask is 1 up to and including EOS and 0 after; pads after; lengths/finished agree."""
    tokens = np.asarray(completions.tokens)
    mask = np.asarray(completions.mask)
    logprobs = np.asarray(completions.logprobs)
    sampling = np.asarray(completions.sampling_logprobs)
    lengths = np.asarray(completions.lengths)
    finished = np.asarray(completions.finished)
    for row in range(tokens.shape[0]):
        kept = tokens[row] if eos is None else truncate_at_eos(tokens[row], eos)
        n = len(kept)
        assert lengths[row] == n
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (tokens[row, n:] == pad).all()
        assert (logprobs[row, n:] == 0.0).all()
        assert (logprobs[row, :n] <= 0.0).all()
        assert (sampling[row, n:] == 0.0).all() and (sampling[row, :n] <= 0.0).all()
        assert finished[row] == (eos is not None and kept[-1] == eos)
        if not finished[row]:
            assert n == max_new


# ---------------------------------------------------------------------------------------------
# The parity checks.


def check_logits_match_hf(ckpt: Checkpoint, ids: np.ndarray, mask: np.ndarray):
    """Each left-padded row gets the logits HF gives the same prompt alone, unpadded."""
    ours = gf_logits(ckpt.model, ids, mask)
    for row, length in enumerate(PROMPT_LENGTHS):
        real = slice(PROMPT_WIDTH - length, PROMPT_WIDTH)
        with torch.no_grad():
            ref = ckpt.hf(torch.as_tensor(ids[row : row + 1, real], dtype=torch.long)).logits
        assert_logits_close(ours[row, real], ref[0].numpy())
    # The logits really vary (a degenerate model would pass trivially).
    assert np.abs(ours).max() > 1.0
    assert len(set(ours[mask == 1].argmax(-1).tolist())) > 2


def check_save_hf_round_trip(ckpt: Checkpoint, ids: np.ndarray, mask: np.ndarray, path: Path):
    """`save_hf` writes what HF reads back to the same logits, and gradflow to the same model."""
    save_hf(ckpt.model, path)
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
    assert type(reloaded_hf) is type(ckpt.hf)
    real = mask == 1
    np.testing.assert_allclose(
        hf_logits(reloaded_hf, ids, mask)[real], hf_logits(ckpt.hf, ids, mask)[real], atol=1e-6
    )
    reloaded = load_hf(path)
    assert reloaded.config == ckpt.model.config
    np.testing.assert_array_equal(gf_logits(reloaded, ids, mask), gf_logits(ckpt.model, ids, mask))


def check_greedy_matches_hf(ckpt: Checkpoint, ids: np.ndarray, mask: np.ndarray, attention: str):
    """Greedy completions equal HF `generate`'s token for token, up to and including an EOS
    that stops some row early; their log-probs are HF's."""
    pad = 0

    def hf_greedy(eos):
        with torch.no_grad():
            out = ckpt.hf.generate(
                input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        return out[:, PROMPT_WIDTH:].numpy()

    # EOS: a token HF emits mid-completion in some row, so that row stops early.
    free = hf_greedy(None)
    assert free.shape == (len(PROMPT_LENGTHS), NEW_TOKENS)
    values, counts = np.unique(free[:, 1:-1], return_counts=True)
    eos = int(values[np.argmax(counts)])
    reference = hf_greedy(eos)

    completions = generate(
        ckpt.model,
        jnp.asarray(ids),
        jnp.asarray(mask),
        key=jax.random.key(0),
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
        eos_token_ids=(eos,),
        pad_token_id=pad,
        decode_attention=attention,
    )
    check_completion_structure(completions, eos, pad, NEW_TOKENS)
    tokens = np.asarray(completions.tokens)
    lengths = np.asarray(completions.lengths)
    for row in range(len(PROMPT_LENGTHS)):
        expected = truncate_at_eos(reference[row], eos)
        np.testing.assert_array_equal(tokens[row, : lengths[row]], expected, err_msg=f"row {row}")
    assert lengths.min() < NEW_TOKENS  # some row stopped early
    assert np.asarray(completions.finished).any()

    expected_logp = completion_logprobs(ckpt.hf, ids, mask, tokens, np.asarray(completions.mask))
    real = np.asarray(completions.mask)
    np.testing.assert_allclose(
        np.asarray(completions.logprobs)[real], expected_logp[real], atol=1e-4, rtol=0
    )
    assert (np.asarray(completions.sampling_logprobs) == 0).all()  # greedy: probability 1
