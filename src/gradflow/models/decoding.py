"""The decoder's weights laid out for one-token decode steps, and the decode step itself.

A decode step is memory-bound: it should read each weight and the KV cache once, in as few kernels
as possible. Slicing one layer out of stacked `[layers, ...]` weights inside the loop (what
`lax.scan` does) can make XLA copy the slice before each matrix product, so `DecodingModel` holds
every layer's weights as separate arrays, cast once to the compute dtype, with the query/key/value
projections concatenated into one matrix and the gate/up projections into another. The step runs
the layers in a Python loop (unrolled in the compiled loop body) against a per-layer `KVCache`.
The layer's math is `AbstractDecoderLayer`'s, the same as in training and prefill; only the
weight fusing and the cache attention are here.

LoRA adapters are not merged into the weights: each step adds `s · (x Aᵀ) Bᵀ` to a projection's
output as a separate term, in the compute dtype, as the training forward pass does. Merging
`W + s · B A` and casting to bfloat16 would decode another policy than the one trained: a small
`B A` is mostly lost in the cast (README, "LoRA").
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .config import ModelConfig
from .decoder import Decoder
from .kv_cache import KVCache
from .layers import (
    DECODE_ATTENTION,
    PALLAS_BLOCK,
    AbstractDecoderLayer,
    DecoderLayer,
    attend_cache,
    embed_tokens,
    linear,
    norm,
    softcap,
)
from .lora import LoraAdapters, adapted
from .rope import rotary_tables


class DecodingLayer(AbstractDecoderLayer):
    """One decoder layer's weights for decoding (HF `[out, in]` layout, compute dtype), with the
    query/key/value projections fused into one matrix and the gate/up projections into another,
    and the layer's LoRA adapters (in their parameter dtype), applied as a separate term.
    """

    input_norm: Float[Array, " hidden"]
    qkv_proj: Float[Array, "qkv_out hidden"]
    qkv_bias: Float[Array, " qkv_out"] | None
    q_norm: Float[Array, " head_dim"] | None
    k_norm: Float[Array, " head_dim"] | None
    o_proj: Float[Array, "hidden q_out"]
    attention_out_norm: Float[Array, " hidden"] | None
    post_norm: Float[Array, " hidden"]
    gate_up_proj: Float[Array, "gate_up hidden"]
    down_proj: Float[Array, "hidden intermediate"]
    mlp_out_norm: Float[Array, " hidden"] | None
    lora: LoraAdapters | None

    @staticmethod
    def from_layer(layer: DecoderLayer, dtype: str) -> "DecodingLayer":
        """Concatenates and casts the weights of one (unstacked) `DecoderLayer`; its adapters
        are kept as they are.

        **Arguments:**

        - `layer`: the layer's weights.
        - `dtype`: the compute dtype.

        **Returns:**

        The `DecodingLayer`.
        """

        def cast(w):
            return None if w is None else w.astype(dtype)

        bias = None
        if layer.q_bias is not None:
            bias = jnp.concatenate([layer.q_bias, layer.k_bias, layer.v_bias]).astype(dtype)
        return DecodingLayer(
            input_norm=cast(layer.input_norm),
            qkv_proj=jnp.concatenate([layer.q_proj, layer.k_proj, layer.v_proj]).astype(dtype),
            qkv_bias=bias,
            q_norm=cast(layer.q_norm),
            k_norm=cast(layer.k_norm),
            o_proj=cast(layer.o_proj),
            attention_out_norm=cast(layer.attention_out_norm),
            post_norm=cast(layer.post_norm),
            gate_up_proj=jnp.concatenate([layer.gate_proj, layer.up_proj]).astype(dtype),
            down_proj=cast(layer.down_proj),
            mlp_out_norm=cast(layer.mlp_out_norm),
            lora=layer.lora,
        )

    def _adapted(self, name: str, x, y):
        return adapted(self.lora, name, x, y)

    def project_qkv(
        self, x: Float[Array, "*batch hidden"]
    ) -> tuple[
        Float[Array, "*batch q_out"], Float[Array, "*batch kv_out"], Float[Array, "*batch kv_out"]
    ]:
        q_out = self.o_proj.shape[1]
        kv_out = (self.qkv_proj.shape[0] - q_out) // 2
        qkv = linear(x, self.qkv_proj, self.qkv_bias)
        q, k, v = jnp.split(qkv, [q_out, q_out + kv_out], axis=-1)
        return (
            self._adapted("q_proj", x, q),
            self._adapted("k_proj", x, k),
            self._adapted("v_proj", x, v),
        )

    def project_gate_up(
        self, x: Float[Array, "*batch hidden"]
    ) -> tuple[Float[Array, "*batch intermediate"], Float[Array, "*batch intermediate"]]:
        gate, up = jnp.split(linear(x, self.gate_up_proj), 2, axis=-1)
        return self._adapted("gate_proj", x, gate), self._adapted("up_proj", x, up)

    def project_out(self, x: Float[Array, "*batch q_out"]) -> Float[Array, "*batch hidden"]:
        return self._adapted("o_proj", x, linear(x, self.o_proj))

    def project_down(self, x: Float[Array, "*batch intermediate"]) -> Float[Array, "*batch hidden"]:
        return self._adapted("down_proj", x, linear(x, self.down_proj))

    def __call__(
        self,
        h: Float[Array, "batch hidden"],
        cos: Float[Array, "batch head_dim"],
        sin: Float[Array, "batch head_dim"],
        keys: Float[Array, "batch kv_heads slots head_dim"],
        values: Float[Array, "batch kv_heads slots head_dim"],
        slot: Int[Array, ""],
        start: Int[Array, " batch"],
        window: int | None,
        config: ModelConfig,
        attention: str,
    ) -> tuple[
        Float[Array, "batch hidden"],
        Float[Array, "batch kv_heads slots head_dim"],
        Float[Array, "batch kv_heads slots head_dim"],
    ]:
        """The layer on one token per row: writes its key and value at `slot`, then attends.

        **Arguments:**

        - `h`: the residual stream entering the layer.
        - `cos`, `sin`: rotary tables for these tokens (this layer's kind).
        - `keys`, `values`: this layer's cache.
        - `slot`: the cache slot of this token.
        - `start`: each row's first real slot (it attends to `start … slot`).
        - `window`: this layer's sliding window (the token sees at most the `window` newest
          slots, itself included), or `None`.
        - `config`: the model config.
        - `attention`: the `attend_cache` implementation.

        **Returns:**

        `(h, keys, values)`: the residual stream leaving the layer and the updated cache.
        """
        q, k, v = self.qkv(h, cos, sin, config)
        keys = jax.lax.dynamic_update_slice(keys, k[:, :, None], (0, 0, slot, 0))
        values = jax.lax.dynamic_update_slice(values, v[:, :, None], (0, 0, slot, 0))
        if window is not None:
            start = jnp.maximum(start, slot + 1 - window)
        out = attend_cache(
            q,
            keys,
            values,
            start,
            slot + 1,
            attention,
            config.attention_scale,
        )
        return self.finish(h, out, config), keys, values


class DecodingModel(eqx.Module):
    """A `Decoder`'s weights for decoding: per-layer arrays in the compute dtype (the embedding
    table stays in the parameter dtype: a step gathers only its rows, as the prefill does).

    Build it with `DecodingModel.from_decoder` once per generation, outside the decode loop.
    """

    embed: Float[Array, "vocab hidden"]
    layers: tuple[DecodingLayer, ...]
    final_norm: Float[Array, " hidden"]
    head: Float[Array, "vocab hidden"]
    config: ModelConfig = eqx.field(static=True)
    attention: str = eqx.field(static=True)
    compute_dtype: str = eqx.field(static=True)

    def __check_init__(self):
        if self.attention not in DECODE_ATTENTION:
            raise ValueError(f"attention must be one of {DECODE_ATTENTION}, got {self.attention!r}")

    @staticmethod
    def from_decoder(model: Decoder, attention: str = "auto") -> "DecodingModel":
        """Unstacks and concatenates the layers and casts them to `model.compute_dtype`.

        **Arguments:**

        - `model`: the decoder.
        - `attention`: the decode-attention implementation, one of `DECODE_ATTENTION`, or
          `"auto"`: `"pallas"` when this process drives a single GPU, `"xla"` elsewhere (the
          Pallas kernel has no rule for splitting it over a device mesh, which XLA would meet
          by gathering the whole cache onto every device).

        **Returns:**

        The `DecodingModel`.
        """
        if attention == "auto":
            single_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
            attention = "pallas" if single_gpu else "xla"
        dtype = model.compute_dtype
        layers = tuple(
            DecodingLayer.from_layer(jax.tree.map(lambda w, i=i: w[i], model.layers), dtype)
            for i in range(model.config.num_layers)
        )
        return DecodingModel(
            embed=model.embed,
            layers=layers,
            final_norm=model.final_norm.astype(dtype),
            head=model.head_weight.astype(dtype),
            config=model.config,
            attention=attention,
            compute_dtype=dtype,
        )

    def cache_slots(self, tokens: int) -> int:
        """The number of cache slots to allocate for `tokens` tokens (the Pallas kernel needs a
        multiple of its block).

        **Arguments:**

        - `tokens`: prompt length plus tokens to generate.

        **Returns:**

        The slot count.
        """
        if self.attention == "pallas":
            return -(-tokens // PALLAS_BLOCK) * PALLAS_BLOCK
        return tokens

    def logits(self, hidden: Float[Array, "batch hidden"]) -> Float[Array, "batch vocab"]:
        """Float32 logits of final-normed hidden states (the matmul runs in the compute dtype),
        soft-capped when the config says so.

        **Arguments:**

        - `hidden`: final-normed hidden states.

        **Returns:**

        Logits over the vocabulary.
        """
        logits = jax.lax.dot_general(
            hidden, self.head, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        return softcap(logits, self.config.final_logit_softcapping)

    def decode(
        self,
        token: Int[Array, " batch"],
        position: Int[Array, " batch"],
        slot: Int[Array, ""],
        cache: KVCache,
    ) -> tuple[Float[Array, "batch hidden"], KVCache]:
        """One token per row through the model, extending the KV cache at `slot`.

        **Arguments:**

        - `token`: the newest token of each row.
        - `position`: its position (the row's count of real tokens before it).
        - `slot`: the cache slot it is written to (the same for every row).
        - `cache`: the KV cache.

        **Returns:**

        `(hidden, cache)`: the final-normed hidden state of this token and the updated cache.
        """
        config = self.config
        tables = {False: rotary_tables(config, position)}
        if config.rope_local_theta is not None:
            tables[True] = rotary_tables(config, position, local=True)
        h = embed_tokens(self.embed, token, config, self.compute_dtype)
        keys, values = [], []
        for layer, window, layer_keys, layer_values in zip(
            self.layers, config.layer_windows, cache.keys, cache.values, strict=True
        ):
            cos, sin = tables[window is not None and config.rope_local_theta is not None]
            h, layer_keys, layer_values = layer(
                h,
                cos,
                sin,
                layer_keys,
                layer_values,
                slot,
                cache.start,
                window,
                config,
                self.attention,
            )
            keys.append(layer_keys)
            values.append(layer_values)
        hidden = norm(h, self.final_norm, config)
        return hidden, KVCache(keys=tuple(keys), values=tuple(values), start=cache.start)
