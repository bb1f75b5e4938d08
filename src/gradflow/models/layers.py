"""One decoder layer: RMSNorms, grouped-query attention with RoPE, a gated MLP.

The layer's math is written once, in `AbstractDecoderLayer`; the family options of the config
(q/k norms, Gemma's norms, the activation, the attention scale, sliding windows) all act there
or in the two attention functions; logit soft-capping acts on the LM head's output (`softcap`). Two final layers hold the weights: `DecoderLayer`
keeps Hugging Face's layout (`[out_features, in_features]`, so checkpoint I/O is a rename) and is
stacked along a leading axis and run with `lax.scan` by `Decoder`; `DecodingLayer`
(`decoding.py`) holds one layer's weights fused for one-token decode steps.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .config import ModelConfig
from .lora import LoraAdapters, adapted
from .rope import apply_rotary

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def rms_norm(
    x: Float[Array, "*batch hidden"],
    weight: Float[Array, " hidden"],
    eps: float,
    unit_offset: bool = False,
) -> Float[Array, "*batch hidden"]:
    """Root-mean-square layer norm, statistics in float32 (as HF computes it).

    **Arguments:**

    - `x`: activations.
    - `weight`: the learned scale.
    - `eps`: added to the mean square.
    - `unit_offset`: Gemma's norm: scale by `1 + weight`, in float32, before the cast back
      (Qwen/Llama cast first, then scale by `weight` in `x`'s dtype).

    **Returns:**

    The normalised activations, in `x`'s dtype.
    """
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def norm(
    x: Float[Array, "*batch dim"], weight: Float[Array, " dim"], config: ModelConfig
) -> Float[Array, "*batch dim"]:
    """`rms_norm` as the config's family computes it.

    **Arguments:**

    - `x`: activations.
    - `weight`: the learned scale.
    - `config`: the model config.

    **Returns:**

    The normalised activations, in `x`'s dtype.
    """
    return rms_norm(x, weight, config.rms_norm_eps, config.family.gemma)


def linear(
    x: Float[Array, "*batch fan_in"],
    weight: Float[Array, "fan_out fan_in"],
    bias: Float[Array, " fan_out"] | None = None,
) -> Float[Array, "*batch fan_out"]:
    """`x @ weight.T + bias` in `x`'s dtype (HF layout).

    **Arguments:**

    - `x`: inputs.
    - `weight`: `[out, in]` matrix.
    - `bias`: optional bias.

    **Returns:**

    The outputs.
    """
    # One 2-D matmul over the flattened leading dims: the weight gradient then contracts a
    # single axis, which XLA's CPU backend runs several times faster than a contraction over
    # (batch, time) (one projection's gradient: 4x; the toy model's update: 22% less CPU time).
    flat = x.reshape(-1, x.shape[-1])
    y = jnp.einsum("ni,oi->no", flat, weight.astype(x.dtype)).reshape(*x.shape[:-1], -1)
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def softcap(x: Float[Array, "*shape"], cap: float | None) -> Float[Array, "*shape"]:
    """`cap · tanh(x / cap)` (Gemma's soft-capping of the logits); `x` when `cap` is None.

    **Arguments:**

    - `x`: scores or logits.
    - `cap`: the bound.

    **Returns:**

    The capped values.
    """
    if cap is None:
        return x
    cap = jnp.asarray(cap, x.dtype)
    return cap * jnp.tanh(x / cap)


def embed_tokens(
    embed: Float[Array, "vocab hidden"], ids: Int[Array, "*batch"], config: ModelConfig, dtype
) -> Float[Array, "*batch hidden"]:
    """Token embeddings in `dtype`; Gemma scales them by √hidden in the embedding's dtype, as HF.

    **Arguments:**

    - `embed`: the embedding table.
    - `ids`: token ids.
    - `config`: the model config.
    - `dtype`: the compute dtype.

    **Returns:**

    The embeddings.
    """
    x = embed[ids]
    if config.family.gemma:
        x = x * jnp.asarray(np.float32(config.hidden_size**0.5), x.dtype)
    return x.astype(dtype)


def attend(
    q: Float[Array, "batch time heads head_dim"],
    k: Float[Array, "batch keys kv_heads head_dim"],
    v: Float[Array, "batch keys kv_heads head_dim"],
    query_index: Int[Array, "batch time"],
    key_valid: Bool[Array, "batch keys"],
    window: Int[Array, ""] | None,
    scale: float,
    implementation: str | None = None,
    segment_ids: Int[Array, "batch keys"] | None = None,
    prefix_ids: Int[Array, "batch keys"] | None = None,
    positions: Int[Array, "batch keys"] | None = None,
) -> Float[Array, "batch time heads head_dim"]:
    """Causal grouped-query attention over key slots `0 … keys-1`.

    Query `t` of row `b` sits at slot `query_index[b, t]` and sees the valid slots at or before
    it, fewer than `window` slots back (and always itself, so that padding rows stay finite);
    with `segment_ids` (packed rows, where queries and keys are the same slots) only the slots
    of its own segment and, with `prefix_ids`, those of the segment its own continues (a
    completion: its prompt, packed once for the completions that share it), and the window
    counts `positions`, not slots.

    **Arguments:**

    - `q`, `k`, `v`: queries, keys and values (`heads` a multiple of `kv_heads`).
    - `query_index`: the key slot of each query.
    - `key_valid`: which key slots hold real tokens.
    - `window`: how many slots a query sees (itself included); `None`: all before it.
    - `scale`: the factor on query·key scores.
    - `implementation`: `None`/`"xla"`/`"cudnn"`, passed to `jax.nn.dot_product_attention`.
    - `segment_ids`: the sequence each slot belongs to (`None`: one sequence per row).
    - `prefix_ids`: with `segment_ids`, the segment each slot also sees (`None`: none).
    - `positions`: with `segment_ids`, each slot's position (`None`: the window counts slots).

    **Returns:**

    The attention outputs.
    """
    slots = jnp.arange(k.shape[1])
    distance = query_index[:, :, None] - slots[None, None, :]
    allowed = (distance >= 0) & (key_valid[:, None, :] | (distance == 0))
    if segment_ids is not None:
        seen = segment_ids[:, :, None] == segment_ids[:, None, :]
        if prefix_ids is not None:
            seen = seen | (prefix_ids[:, :, None] == segment_ids[:, None, :])
        allowed = allowed & seen
        if positions is not None:
            distance = positions[:, :, None] - positions[:, None, :]
    if window is not None:
        allowed = allowed & (distance < window)
    # jax's XLA attention promotes bfloat16 against float32 internally, which strict promotion
    # (used in tests) rejects; the result is the same under standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=allowed[:, None, :, :], scale=scale, implementation=implementation
        )


DECODE_ATTENTION = ("xla", "pallas")
"""Implementations of `attend_cache`: XLA, or JAX's Pallas (Triton) decode-attention kernel."""

PALLAS_BLOCK = 64
"""Key slots per block of the Pallas kernel; its cache needs a multiple of this many slots."""


def attend_cache(
    q: Float[Array, "batch heads head_dim"],
    keys: Float[Array, "batch kv_heads slots head_dim"],
    values: Float[Array, "batch kv_heads slots head_dim"],
    start: Int[Array, " batch"],
    end: Int[Array, ""],
    implementation: str,
    scale: float,
) -> Float[Array, "batch heads head_dim"]:
    """Grouped-query attention of one query per row over the cache slots `start[b] … end-1`.

    - `"xla"` reads the whole cache, masks, and takes a float32 softmax; the weighted sum of
      values runs in the cache's dtype, as `jax.nn.dot_product_attention` does it.
    - `"pallas"` runs JAX's Pallas decode-attention kernel (Triton, GPU only; interpreted on
      other backends, for tests): one pass over blocks of `PALLAS_BLOCK` slots that reads only
      the blocks holding slots before `end`, with an online float32 softmax.

    **Arguments:**

    - `q`: the queries (`heads` a multiple of `kv_heads`).
    - `keys`, `values`: a layer's cache.
    - `start`: each row's first slot to attend to (its first real one, or the first inside a
      sliding window).
    - `end`: one past the newest slot (the same for every row).
    - `implementation`: one of `DECODE_ATTENTION`.
    - `scale`: the factor on query·key scores.

    **Returns:**

    The attention outputs.
    """
    batch, heads, head_dim = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    if implementation == "pallas":
        from jax.experimental.pallas.ops.gpu.decode_attention import gqa

        # The kernel mixes dtypes internally (see `attend`) and returns its float32 normaliser's
        # dtype.
        with jax.numpy_dtype_promotion("standard"):
            out = gqa(
                q,
                keys.swapaxes(1, 2),
                values.swapaxes(1, 2),
                start,
                end,
                sm_scale=scale,
                block_k=PALLAS_BLOCK,
                k_splits=slots // PALLAS_BLOCK,
                interpret=jax.default_backend() != "gpu",
            )
        return out.astype(q.dtype)
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum(
        "bkgd,bksd->bkgs", grouped, keys, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    index = jnp.arange(slots)
    allowed = (index[None, :] >= start[:, None]) & (index < end)[None, :]
    scores = jnp.where(allowed[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, values)
    return out.reshape(batch, heads, head_dim)


class AbstractDecoderLayer(eqx.Module):
    """The math of one decoder layer, for any layout of its projection weights.

    Pre-norm residual blocks: `h + A(norm(h))`, then `h + M(norm(h))`, where the attention
    projects to query, key and value heads (q/k heads RMS-normed when the family has q/k norms),
    rotates queries and keys, attends (`attend` or `attend_cache`, chosen by the caller) and
    projects back; the MLP is `down(act(gate(x)) · up(x))`. Gemma also norms each block's
    output (`attention_out_norm`, `mlp_out_norm`) before adding it. A subclass supplies the
    weights and the four projections.
    """

    input_norm: eqx.AbstractVar[Float[Array, " hidden"]]
    q_norm: eqx.AbstractVar[Float[Array, " head_dim"] | None]
    k_norm: eqx.AbstractVar[Float[Array, " head_dim"] | None]
    attention_out_norm: eqx.AbstractVar[Float[Array, " hidden"] | None]
    post_norm: eqx.AbstractVar[Float[Array, " hidden"]]
    mlp_out_norm: eqx.AbstractVar[Float[Array, " hidden"] | None]

    @abc.abstractmethod
    def project_qkv(
        self, x: Float[Array, "*batch hidden"]
    ) -> tuple[
        Float[Array, "*batch q_out"], Float[Array, "*batch kv_out"], Float[Array, "*batch kv_out"]
    ]:
        """The query, key and value projections (biases included) of the normed stream."""

    @abc.abstractmethod
    def project_gate_up(
        self, x: Float[Array, "*batch hidden"]
    ) -> tuple[Float[Array, "*batch intermediate"], Float[Array, "*batch intermediate"]]:
        """The MLP's gate and up projections of the normed stream."""

    @abc.abstractmethod
    def project_out(self, x: Float[Array, "*batch q_out"]) -> Float[Array, "*batch hidden"]:
        """The attention output projection of the concatenated heads."""

    @abc.abstractmethod
    def project_down(self, x: Float[Array, "*batch intermediate"]) -> Float[Array, "*batch hidden"]:
        """The MLP's down projection."""

    def qkv(
        self,
        h: Float[Array, "*batch hidden"],
        cos: Float[Array, "*batch head_dim"],
        sin: Float[Array, "*batch head_dim"],
        config: ModelConfig,
    ) -> tuple[
        Float[Array, "*batch heads head_dim"],
        Float[Array, "*batch kv_heads head_dim"],
        Float[Array, "*batch kv_heads head_dim"],
    ]:
        """Normalises the residual stream and projects it to rotated queries and keys, and values.

        **Arguments:**

        - `h`: the residual stream entering the layer (`[batch, time]` tokens in a forward
          pass, `[batch]` in a decode step).
        - `cos`, `sin`: rotary tables for these tokens (this layer's kind).
        - `config`: the model config.

        **Returns:**

        `(q, k, v)`.
        """
        lead = h.shape[:-1]
        q, k, v = self.project_qkv(norm(h, self.input_norm, config))
        q = q.reshape(*lead, config.num_heads, config.head_dim)
        k = k.reshape(*lead, config.num_kv_heads, config.head_dim)
        v = v.reshape(*lead, config.num_kv_heads, config.head_dim)
        if self.q_norm is not None:
            q = norm(q, self.q_norm, config)
        if self.k_norm is not None:
            k = norm(k, self.k_norm, config)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(
        self,
        h: Float[Array, "*batch hidden"],
        attention: Float[Array, "*batch heads head_dim"],
        config: ModelConfig,
    ) -> Float[Array, "*batch hidden"]:
        """Adds the attention output projection and the gated MLP to the residual stream.

        **Arguments:**

        - `h`: the residual stream entering the layer.
        - `attention`: the attention outputs of this layer.
        - `config`: the model config.

        **Returns:**

        The residual stream leaving the layer.
        """
        out = self.project_out(attention.reshape(*h.shape[:-1], -1))
        if self.attention_out_norm is not None:
            out = norm(out, self.attention_out_norm, config)
        h = h + out
        gate, up = self.project_gate_up(norm(h, self.post_norm, config))
        out = self.project_down(ACTIVATIONS[config.hidden_act](gate) * up)
        if self.mlp_out_norm is not None:
            out = norm(out, self.mlp_out_norm, config)
        return h + out


class DecoderLayer(AbstractDecoderLayer):
    """The weights of one (or, stacked along a leading axis, every) decoder layer, HF layout.

    `q_norm`/`k_norm` exist with the family's q/k norms, `attention_out_norm`/`mlp_out_norm` with
    Gemma's; the q/k/v biases with Qwen2's; `lora` holds LoRA adapters on some projections
    (`gradflow.models.lora`), applied factored as `x Wᵀ + s · (x Aᵀ) Bᵀ`.
    """

    input_norm: Float[Array, "*layers hidden"]
    q_proj: Float[Array, "*layers q_out hidden"]
    k_proj: Float[Array, "*layers kv_out hidden"]
    v_proj: Float[Array, "*layers kv_out hidden"]
    o_proj: Float[Array, "*layers hidden q_out"]
    q_bias: Float[Array, "*layers q_out"] | None
    k_bias: Float[Array, "*layers kv_out"] | None
    v_bias: Float[Array, "*layers kv_out"] | None
    q_norm: Float[Array, "*layers head_dim"] | None
    k_norm: Float[Array, "*layers head_dim"] | None
    attention_out_norm: Float[Array, "*layers hidden"] | None
    post_norm: Float[Array, "*layers hidden"]
    gate_proj: Float[Array, "*layers intermediate hidden"]
    up_proj: Float[Array, "*layers intermediate hidden"]
    down_proj: Float[Array, "*layers hidden intermediate"]
    mlp_out_norm: Float[Array, "*layers hidden"] | None
    lora: LoraAdapters | None = None

    @staticmethod
    def init(config: ModelConfig, *, key: PRNGKeyArray, dtype=jnp.float32) -> "DecoderLayer":
        """Random weights (normal, std 0.02; norms the identity; biases 0) for one layer.

        **Arguments:**

        - `config`: the model config.
        - `key`: PRNG key.
        - `dtype`: parameter dtype.

        **Returns:**

        A `DecoderLayer`.
        """
        d, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
        q_out = config.num_heads * hd
        kv_out = config.num_kv_heads * hd
        family = config.family
        keys = jax.random.split(key, 7)

        def normal(k, shape):
            return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

        def bias(n):
            return jnp.zeros((n,), dtype) if family.qkv_bias else None

        def identity_norm(n, present=True):
            # Gemma's norms scale by 1 + weight.
            return jnp.full((n,), 0.0 if family.gemma else 1.0, dtype) if present else None

        return DecoderLayer(
            input_norm=identity_norm(d),
            q_proj=normal(keys[0], (q_out, d)),
            k_proj=normal(keys[1], (kv_out, d)),
            v_proj=normal(keys[2], (kv_out, d)),
            o_proj=normal(keys[3], (d, q_out)),
            q_bias=bias(q_out),
            k_bias=bias(kv_out),
            v_bias=bias(kv_out),
            q_norm=identity_norm(hd, family.qk_norm),
            k_norm=identity_norm(hd, family.qk_norm),
            attention_out_norm=identity_norm(d, family.gemma),
            post_norm=identity_norm(d),
            gate_proj=normal(keys[4], (i, d)),
            up_proj=normal(keys[5], (i, d)),
            down_proj=normal(keys[6], (d, i)),
            mlp_out_norm=identity_norm(d, family.gemma),
        )

    def _project(self, name: str, x, bias=None):
        return adapted(self.lora, name, x, linear(x, getattr(self, name), bias))

    def project_qkv(
        self, x: Float[Array, "*batch hidden"]
    ) -> tuple[
        Float[Array, "*batch q_out"], Float[Array, "*batch kv_out"], Float[Array, "*batch kv_out"]
    ]:
        return (
            self._project("q_proj", x, self.q_bias),
            self._project("k_proj", x, self.k_bias),
            self._project("v_proj", x, self.v_bias),
        )

    def project_gate_up(
        self, x: Float[Array, "*batch hidden"]
    ) -> tuple[Float[Array, "*batch intermediate"], Float[Array, "*batch intermediate"]]:
        return self._project("gate_proj", x), self._project("up_proj", x)

    def project_out(self, x: Float[Array, "*batch q_out"]) -> Float[Array, "*batch hidden"]:
        return self._project("o_proj", x)

    def project_down(self, x: Float[Array, "*batch intermediate"]) -> Float[Array, "*batch hidden"]:
        return self._project("down_proj", x)

    def merged(self) -> "DecoderLayer":
        """The layer with its adapters merged into the projections (`W + s · B A`), no adapters.

        **Returns:**

        The `DecoderLayer` (this one when it has no adapters).
        """
        if self.lora is None:
            return self
        names = self.lora.targets
        return eqx.tree_at(
            lambda layer: (*(getattr(layer, n) for n in names), layer.lora),
            self,
            (*(self.lora.merged(n, getattr(self, n)) for n in names), None),
            is_leaf=lambda x: x is None,
        )
