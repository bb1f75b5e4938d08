"""The decoder: embeddings, `lax.scan` over stacked layers, final norm, LM head.

Positions come from the attention mask (`cumsum(mask) - 1`), so a left-padded row gets exactly
the logits it would get alone; in packed rows (`segment_ids`) they restart in each segment and
attention stays inside it, so each packed sequence gets the logits it would get alone too. Sliding-window layers (Mistral, Gemma 3) are scanned with the
others: each layer's window (and, for Gemma 3, its RoPE base) rides along with its weights.
The same layers serve a full forward pass (`__call__`,
`hidden_states`) and the prefill that fills a KV cache; one-token decode steps run on the
per-layer layout of `DecodingModel`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .attention import attend_blocked
from .config import ModelConfig
from .kv_cache import KVCache
from .layers import DecoderLayer, attend, embed_tokens, norm, softcap
from .lora import LoraAdapters, resolve_targets
from .rope import rotary_tables

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def trainable(tree):
    """The filter spec of what an optimizer trains in `tree` (a model, a train state, a
    gradient): every floating-point array, except in a `Decoder` with LoRA adapters, where only
    the adapters are (its base weights are frozen).

    **Arguments:**

    - `tree`: any pytree.

    **Returns:**

    A pytree of bools with `tree`'s structure, for `eqx.filter` / `eqx.partition`.
    """

    def spec(node):
        if isinstance(node, Decoder) and node.lora is not None:
            frozen = jax.tree.map(lambda _: False, node.adapters_off())
            return frozen.replace_adapters(jax.tree.map(eqx.is_inexact_array, node.lora))
        return jax.tree.map(eqx.is_inexact_array, node)

    return jax.tree.map(spec, tree, is_leaf=lambda x: isinstance(x, Decoder))


def positions_from_mask(
    mask: Bool[Array, "batch time"] | Int[Array, "batch time"],
) -> Int[Array, "batch time"]:
    """Token positions for a (left-)padded batch: `max(cumsum(mask) - 1, 0)`.

    **Arguments:**

    - `mask`: 1 on real tokens.

    **Returns:**

    The position of each token (padding gets 0).
    """
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: Int[Array, "batch time"]) -> Int[Array, "batch time"]:
    """Token positions in packed rows: each run of equal segment ids starts again at 0.

    **Arguments:**

    - `segment_ids`: the sequence each slot belongs to (each sequence's slots contiguous).

    **Returns:**

    The position of each token within its segment.
    """
    slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1]), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
        axis=-1,
    )
    first = jax.lax.cummax(jnp.where(starts, slots, 0), axis=segment_ids.ndim - 1)
    return slots - first


class Decoder(eqx.Module):
    """A causal language model of any family `ModelConfig` reads (Qwen2/2.5/3, Llama, Mistral,
    Gemma 3 text).

    Parameters are stored in `param_dtype` (whatever they were created or loaded with) and cast to
    `compute_dtype` layer by layer; norms, RoPE, softmax statistics and logits are float32.
    `attention_impl` chooses the attention of the forward pass and the prefill: `None` runs
    `jax.nn.dot_product_attention`'s XLA path in the forward pass and `attend_blocked` (query
    and key blocks, online softmax) in the prefill; `"xla"` or `"cudnn"` runs
    `jax.nn.dot_product_attention` with that implementation in both. `scan_layers = False`
    unrolls the layers of the full forward pass (and so of its backward pass) instead of
    scanning them: the same values, and at small shapes on the CPU a faster update (a scan
    stacks each layer's residuals into zero-initialised buffers, written and read slice by
    slice: about a third of the toy model's update in a profile), at the price of compiling
    every layer separately; the prefill always scans (decoding is unrolled already).
    """

    embed: Float[Array, "vocab hidden"]
    layers: DecoderLayer
    final_norm: Float[Array, " hidden"]
    lm_head: Float[Array, "vocab hidden"] | None
    config: ModelConfig = eqx.field(static=True)
    compute_dtype: str = eqx.field(static=True, default="float32")
    remat: str = eqx.field(static=True, default="none")
    attention_impl: str | None = eqx.field(static=True, default=None)
    scan_layers: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.config.tie_word_embeddings != (self.lm_head is None):
            raise ValueError("lm_head must be None exactly when tie_word_embeddings is true")

    @staticmethod
    def init(config: ModelConfig, *, key: PRNGKeyArray, dtype=jnp.float32) -> "Decoder":
        """Random weights with the config's shapes.

        **Arguments:**

        - `config`: the model config.
        - `key`: PRNG key.
        - `dtype`: parameter (and compute) dtype.

        **Returns:**

        A `Decoder`.
        """
        k_embed, k_layers, k_head = jax.random.split(key, 3)
        shape = (config.vocab_size, config.hidden_size)
        embed = (0.02 * jax.random.normal(k_embed, shape, jnp.float32)).astype(dtype)
        layer_keys = jax.random.split(k_layers, config.num_layers)
        layers = eqx.filter_vmap(lambda k: DecoderLayer.init(config, key=k, dtype=dtype))(
            layer_keys
        )
        head = None
        if not config.tie_word_embeddings:
            head = (0.02 * jax.random.normal(k_head, shape, jnp.float32)).astype(dtype)
        return Decoder(
            embed=embed,
            layers=layers,
            final_norm=jnp.full((config.hidden_size,), 0.0 if config.family.gemma else 1.0, dtype),
            lm_head=head,
            config=config,
            compute_dtype=jnp.dtype(dtype).name,
        )

    @property
    def lora(self) -> LoraAdapters | None:
        """The LoRA adapters of every layer (stacked), or `None`."""
        return self.layers.lora

    def with_lora(
        self,
        rank: int,
        alpha: "float | int",
        targets: "str | list[str] | tuple[str, ...]" = "all-linear",
        *,
        dropout: float = 0.0,
        key: PRNGKeyArray,
    ) -> "Decoder":
        """This model with fresh LoRA adapters (`B = 0`: it computes what it computed before).

        **Arguments:**

        - `rank`: `r` (≥ 1).
        - `alpha`: the update is scaled by `alpha / rank`.
        - `targets`: `"all-linear"` or a list of projection names (`gradflow.models.lora`).
        - `dropout`: the rate at which the adapters' inputs are dropped in training.
        - `key`: PRNG key for `A`.

        **Returns:**

        The `Decoder` with adapters (float32, whatever the base's dtype).
        """
        names = resolve_targets(targets)
        keys = jax.random.split(key, self.config.num_layers)
        adapters = eqx.filter_vmap(
            lambda k: LoraAdapters.init(self.config, rank, alpha, names, dropout=dropout, key=k)
        )(keys)
        return self.replace_adapters(adapters)

    def replace_adapters(self, adapters: LoraAdapters | None) -> "Decoder":
        """This model with `adapters` (stacked over layers) in place of its own.

        **Arguments:**

        - `adapters`: the new adapters, or `None` (the base model).

        **Returns:**

        The `Decoder` (sharing every base weight with this one).
        """
        return eqx.tree_at(lambda m: m.layers.lora, self, adapters, is_leaf=lambda x: x is None)

    def with_dropout(self, key: PRNGKeyArray) -> "Decoder":
        """This model with its adapters' dropout switched on, drawn from `key` (unchanged without
        adapters or with a dropout rate of 0).

        **Arguments:**

        - `key`: PRNG key of this forward pass's dropout masks.

        **Returns:**

        The `Decoder`.
        """
        if self.lora is None or self.lora.dropout == 0.0:
            return self
        keys = jax.random.split(key, self.config.num_layers)
        return eqx.tree_at(
            lambda m: m.layers.lora.dropout_key, self, keys, is_leaf=lambda x: x is None
        )

    def fold_in_dropout(self, data: Int[Array, ""]) -> "Decoder":
        """This model with `data` folded into its adapters' dropout keys: another draw of the
        masks for another part of the batch (a packed block). Unchanged without dropout keys.

        **Arguments:**

        - `data`: an integer naming the part (the packed block's index).

        **Returns:**

        The `Decoder`.
        """
        if self.lora is None or self.lora.dropout_key is None:
            return self
        keys = jax.vmap(lambda k: jax.random.fold_in(k, data))(self.lora.dropout_key)
        return eqx.tree_at(lambda m: m.layers.lora.dropout_key, self, keys)

    def adapters_off(self) -> "Decoder":
        """The base model: this one with its LoRA adapters switched off (no weights copied).

        **Returns:**

        The `Decoder` without adapters.
        """
        return self.replace_adapters(None)

    def merge_adapters(self) -> "Decoder":
        """This model with its adapters merged into its weights (`W + s · B A`), none left.

        **Returns:**

        A plain `Decoder` that computes what this one computes.
        """
        if self.lora is None:
            return self
        return eqx.tree_at(lambda m: m.layers, self, self.layers.merged())

    @property
    def head_weight(self) -> Float[Array, "vocab hidden"]:
        """The LM head matrix (the embedding when tied)."""
        return self.embed if self.lm_head is None else self.lm_head

    def _run_layers(
        self,
        input_ids: Int[Array, "batch time"],
        attention_mask: Bool[Array, "batch time"] | Int[Array, "batch time"],
        keep_cache: bool,
        segment_ids: Int[Array, "batch time"] | None = None,
        prefix_ids: Int[Array, "batch time"] | None = None,
        positions: Int[Array, "batch time"] | None = None,
    ) -> tuple[Float[Array, "batch time hidden"], tuple | None]:
        """The residual stream after the last layer (not final-normed), and every layer's keys
        and values (stacked) when `keep_cache`."""
        config = self.config
        b, t = input_ids.shape
        given = positions
        if positions is None and segment_ids is None:
            positions = positions_from_mask(attention_mask)
        elif positions is None:
            positions = positions_from_segments(segment_ids)
        cos, sin = rotary_tables(config, positions)
        query_index = jnp.broadcast_to(jnp.arange(t), (b, t))
        key_valid = attention_mask.astype(bool)
        # Scanned with each layer's weights: whether it slides, and its window (`t`, i.e.
        # everything, on full layers).
        windows = sliding = None
        if config.sliding_window is not None:
            windows = jnp.asarray([w or t for w in config.layer_windows], jnp.int32)
            sliding = jnp.asarray([w is not None for w in config.layer_windows])
        two_ropes = windows is not None and config.rope_local_theta is not None
        if two_ropes:
            local_cos, local_sin = rotary_tables(config, positions, local=True)

        def body(h, xs):
            layer, window, slides = xs
            layer_cos, layer_sin = cos, sin
            if two_ropes:
                layer_cos = jnp.where(slides, local_cos, cos)
                layer_sin = jnp.where(slides, local_sin, sin)
            q, k, v = layer.qkv(h, layer_cos, layer_sin, config)
            if keep_cache and self.attention_impl is None:
                out = attend_blocked(q, k, v, key_valid, window, config.attention_scale)
            else:
                out = attend(
                    q,
                    k,
                    v,
                    query_index,
                    key_valid,
                    window,
                    config.attention_scale,
                    self.attention_impl,
                    segment_ids,
                    prefix_ids,
                    given,
                )
            return layer.finish(h, out, config), (k, v) if keep_cache else None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        embedded = embed_tokens(self.embed, input_ids, config, self.compute_dtype)
        unroll = 1 if self.scan_layers or keep_cache else config.num_layers
        return jax.lax.scan(body, embedded, (self.layers, windows, sliding), unroll=unroll)

    def hidden_states(
        self,
        input_ids: Int[Array, "batch time"],
        attention_mask: Bool[Array, "batch time"] | Int[Array, "batch time"],
        segment_ids: Int[Array, "batch time"] | None = None,
        prefix_ids: Int[Array, "batch time"] | None = None,
        positions: Int[Array, "batch time"] | None = None,
    ) -> Float[Array, "batch time hidden"]:
        """The final-normed hidden states of a full forward pass (no cache).

        **Arguments:**

        - `input_ids`: token ids (left padding allowed).
        - `attention_mask`: 1 on real tokens.
        - `segment_ids`: for packed rows, the sequence each slot belongs to (its slots
          contiguous): attention stays inside a segment and positions restart in each
          (`gradflow.packing`); `None`: one sequence per row, positions from the mask.
        - `prefix_ids`: with `segment_ids`, the segment each slot sees besides its own (a
          completion: the prompt it continues, packed once for the completions sharing it).
        - `positions`: with `segment_ids`, each slot's position (`None`: restarting at 0 in
          each segment); sliding windows then count positions.

        **Returns:**

        Hidden states in `compute_dtype`.
        """
        h, _ = self._run_layers(
            input_ids, attention_mask, False, segment_ids, prefix_ids, positions
        )
        return norm(h, self.final_norm, self.config)

    def logits(self, hidden: Float[Array, "*batch hidden"]) -> Float[Array, "*batch vocab"]:
        """Float32 logits of hidden states (the matmul runs in the compute dtype), soft-capped
        when the config says so.

        **Arguments:**

        - `hidden`: final-normed hidden states.

        **Returns:**

        Logits over the vocabulary.
        """
        head = self.head_weight.astype(hidden.dtype)
        flat = hidden.reshape(-1, hidden.shape[-1])  # a 2-D matmul: see `layers.linear`
        logits = jnp.einsum("nd,vd->nv", flat, head, preferred_element_type=jnp.float32)
        logits = logits.reshape(*hidden.shape[:-1], -1)
        return softcap(logits, self.config.final_logit_softcapping)

    def __call__(
        self,
        input_ids: Int[Array, "batch time"],
        attention_mask: Bool[Array, "batch time"] | Int[Array, "batch time"],
    ) -> Float[Array, "batch time vocab"]:
        """Logits of every position.

        **Arguments:**

        - `input_ids`: token ids (left padding allowed).
        - `attention_mask`: 1 on real tokens.

        **Returns:**

        Float32 logits.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def prefill(
        self,
        input_ids: Int[Array, "batch time"],
        attention_mask: Bool[Array, "batch time"] | Int[Array, "batch time"],
        cache_size: int,
    ) -> tuple[Float[Array, "batch hidden"], KVCache]:
        """Runs the prompt and fills slots `0 … time-1` of a new KV cache.

        **Arguments:**

        - `input_ids`: left-padded prompt ids.
        - `attention_mask`: 1 on real prompt tokens.
        - `cache_size`: the number of slots (prompt length plus tokens to generate).

        **Returns:**

        `(hidden, cache)`: the final-normed hidden state of the last prompt slot and the cache
        (in `compute_dtype`).
        """
        h, (keys, values) = self._run_layers(input_ids, attention_mask, keep_cache=True)
        hidden = norm(h[:, -1], self.final_norm, self.config)
        return hidden, KVCache.from_prompt(keys, values, attention_mask, cache_size)
