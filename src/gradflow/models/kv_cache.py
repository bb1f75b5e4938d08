"""The preallocated key/value cache used by the sampler."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .config import ModelConfig


class KVCache(eqx.Module):
    """Keys and values of every layer for `slots` token slots, and which slots hold real tokens.

    Slots `0 … prompt_len-1` hold the (left-padded) prompt; generated tokens follow. Padding slots
    are never attended to.
    """

    keys: Float[Array, "layers batch slots kv_heads head_dim"]
    values: Float[Array, "layers batch slots kv_heads head_dim"]
    valid: Bool[Array, "batch slots"]

    @staticmethod
    def empty(
        config: ModelConfig,
        batch: int,
        slots: int,
        dtype: str,
        prompt_mask: Bool[Array, "batch prompt"] | Int[Array, "batch prompt"],
    ) -> "KVCache":
        """A zero cache whose first slots follow the prompt mask and the rest are valid.

        **Arguments:**

        - `config`: the model config.
        - `batch`: number of rows.
        - `slots`: number of token slots.
        - `dtype`: cache dtype (the compute dtype).
        - `prompt_mask`: 1 on real prompt tokens.

        **Returns:**

        The empty cache.
        """
        shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
        generated = jnp.ones((batch, slots - prompt_mask.shape[1]), bool)
        return KVCache(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            valid=jnp.concatenate([prompt_mask.astype(bool), generated], axis=1),
        )
