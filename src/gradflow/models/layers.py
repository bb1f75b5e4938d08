"""One decoder layer of the Qwen2/Llama family: RMSNorm, grouped-query attention, SwiGLU MLP.

Weights keep Hugging Face's layout (`[out_features, in_features]`), so checkpoint I/O is a rename.
`Decoder` stacks `num_layers` of these along a leading axis and runs them with `lax.scan`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .config import ModelConfig
from .rope import apply_rotary


def rms_norm(
    x: Float[Array, "*batch hidden"], weight: Float[Array, " hidden"], eps: float
) -> Float[Array, "*batch hidden"]:
    """Root-mean-square layer norm, statistics in float32 (as HF computes it).

    **Arguments:**

    - `x`: activations.
    - `weight`: the learned scale.
    - `eps`: added to the mean square.

    **Returns:**

    The normalised activations, in `x`'s dtype.
    """
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


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
    y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def attend(
    q: Float[Array, "batch time heads head_dim"],
    k: Float[Array, "batch keys kv_heads head_dim"],
    v: Float[Array, "batch keys kv_heads head_dim"],
    query_index: Int[Array, "batch time"],
    key_valid: Bool[Array, "batch keys"],
    implementation: str | None = None,
) -> Float[Array, "batch time heads head_dim"]:
    """Causal grouped-query attention over key slots `0 … keys-1`.

    Query `t` of row `b` sits at slot `query_index[b, t]` and sees the slots at or before it that
    are valid (and always itself, so that padding rows stay finite).

    **Arguments:**

    - `q`, `k`, `v`: queries, keys and values (`heads` a multiple of `kv_heads`).
    - `query_index`: the key slot of each query.
    - `key_valid`: which key slots hold real tokens.
    - `implementation`: `None`/`"xla"`/`"cudnn"`, passed to `jax.nn.dot_product_attention`.

    **Returns:**

    The attention outputs.
    """
    slots = jnp.arange(k.shape[1])
    causal = slots[None, None, :] <= query_index[:, :, None]
    own = slots[None, None, :] == query_index[:, :, None]
    allowed = causal & (key_valid[:, None, :] | own)
    # jax's XLA attention promotes bfloat16 against float32 internally, which strict promotion
    # (used in tests) rejects; the result is the same under standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=allowed[:, None, :, :], implementation=implementation
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
    - `start`: each row's first real slot.
    - `end`: one past the newest slot (the same for every row).
    - `implementation`: one of `DECODE_ATTENTION`.

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
                block_k=PALLAS_BLOCK,
                k_splits=slots // PALLAS_BLOCK,
                interpret=jax.default_backend() != "gpu",
            )
        return out.astype(q.dtype)
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum(
        "bkgd,bksd->bkgs", grouped, keys, preferred_element_type=jnp.float32
    ) * jnp.float32(head_dim**-0.5)
    index = jnp.arange(slots)
    allowed = (index[None, :] >= start[:, None]) & (index < end)[None, :]
    scores = jnp.where(allowed[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, values)
    return out.reshape(batch, heads, head_dim)


class DecoderLayer(eqx.Module):
    """The weights of one (or, stacked along a leading axis, every) decoder layer."""

    input_norm: Float[Array, "*layers hidden"]
    q_proj: Float[Array, "*layers q_out hidden"]
    k_proj: Float[Array, "*layers kv_out hidden"]
    v_proj: Float[Array, "*layers kv_out hidden"]
    o_proj: Float[Array, "*layers hidden q_out"]
    q_bias: Float[Array, "*layers q_out"] | None
    k_bias: Float[Array, "*layers kv_out"] | None
    v_bias: Float[Array, "*layers kv_out"] | None
    post_norm: Float[Array, "*layers hidden"]
    gate_proj: Float[Array, "*layers intermediate hidden"]
    up_proj: Float[Array, "*layers intermediate hidden"]
    down_proj: Float[Array, "*layers hidden intermediate"]

    @staticmethod
    def init(config: ModelConfig, *, key: PRNGKeyArray, dtype=jnp.float32) -> "DecoderLayer":
        """Random weights (normal, std 0.02; norms 1; biases 0) for one layer.

        **Arguments:**

        - `config`: the model config.
        - `key`: PRNG key.
        - `dtype`: parameter dtype.

        **Returns:**

        A `DecoderLayer`.
        """
        d, i = config.hidden_size, config.intermediate_size
        q_out = config.num_heads * config.head_dim
        kv_out = config.num_kv_heads * config.head_dim
        keys = jax.random.split(key, 7)

        def normal(k, shape):
            return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

        def bias(n):
            return jnp.zeros((n,), dtype) if config.attention_bias else None

        return DecoderLayer(
            input_norm=jnp.ones((d,), dtype),
            q_proj=normal(keys[0], (q_out, d)),
            k_proj=normal(keys[1], (kv_out, d)),
            v_proj=normal(keys[2], (kv_out, d)),
            o_proj=normal(keys[3], (d, q_out)),
            q_bias=bias(q_out),
            k_bias=bias(kv_out),
            v_bias=bias(kv_out),
            post_norm=jnp.ones((d,), dtype),
            gate_proj=normal(keys[4], (i, d)),
            up_proj=normal(keys[5], (i, d)),
            down_proj=normal(keys[6], (d, i)),
        )

    def qkv(
        self,
        h: Float[Array, "batch time hidden"],
        cos: Float[Array, "batch time head_dim"],
        sin: Float[Array, "batch time head_dim"],
        config: ModelConfig,
    ) -> tuple[
        Float[Array, "batch time heads head_dim"],
        Float[Array, "batch time kv_heads head_dim"],
        Float[Array, "batch time kv_heads head_dim"],
    ]:
        """Normalises the residual stream and projects it to rotated queries and keys, and values.

        **Arguments:**

        - `h`: the residual stream entering the layer.
        - `cos`, `sin`: rotary tables for these tokens.
        - `config`: the model config.

        **Returns:**

        `(q, k, v)`.
        """
        b, t, _ = h.shape
        x = rms_norm(h, self.input_norm, config.rms_norm_eps)
        q = linear(x, self.q_proj, self.q_bias).reshape(b, t, config.num_heads, config.head_dim)
        k = linear(x, self.k_proj, self.k_bias).reshape(b, t, config.num_kv_heads, config.head_dim)
        v = linear(x, self.v_proj, self.v_bias).reshape(b, t, config.num_kv_heads, config.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(
        self,
        h: Float[Array, "batch time hidden"],
        attention: Float[Array, "batch time heads head_dim"],
        config: ModelConfig,
    ) -> Float[Array, "batch time hidden"]:
        """Adds the attention output projection and the SwiGLU MLP to the residual stream.

        **Arguments:**

        - `h`: the residual stream entering the layer.
        - `attention`: the attention outputs of this layer.
        - `config`: the model config.

        **Returns:**

        The residual stream leaving the layer.
        """
        b, t, _ = h.shape
        h = h + linear(attention.reshape(b, t, -1), self.o_proj)
        x = rms_norm(h, self.post_norm, config.rms_norm_eps)
        mlp = jax.nn.silu(linear(x, self.gate_proj)) * linear(x, self.up_proj)
        return h + linear(mlp, self.down_proj)
