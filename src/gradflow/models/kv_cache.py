"""The preallocated key/value cache used by the sampler: one buffer per layer."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class KVCache(eqx.Module):
    """Keys and values of every layer for `slots` token slots, and where each row's tokens start.

    Each layer has its own `[batch, kv_heads, slots, head_dim]` buffer, so that a decode step reads
    and extends it in place (no slicing of a stacked array, which XLA may copy). Slots
    `0 … prompt_len-1` hold the left-padded prompt; generated tokens follow. Row `b`'s real tokens
    are the contiguous slots from `start[b]` on: its left padding is never attended to.
    """

    keys: tuple[Float[Array, "batch kv_heads slots head_dim"], ...]
    values: tuple[Float[Array, "batch kv_heads slots head_dim"], ...]
    start: Int[Array, " batch"]

    @staticmethod
    def from_prompt(
        keys: Float[Array, "layers batch prompt kv_heads head_dim"],
        values: Float[Array, "layers batch prompt kv_heads head_dim"],
        prompt_mask: Bool[Array, "batch prompt"] | Int[Array, "batch prompt"],
        slots: int,
    ) -> "KVCache":
        """A cache whose first slots hold the prompt's keys and values; the rest are zero.

        **Arguments:**

        - `keys`, `values`: every layer's keys and values of the prompt (as the prefill computes
          them).
        - `prompt_mask`: 1 on real prompt tokens, which must be left-padded (real tokens last).
        - `slots`: number of token slots (at least the prompt length plus tokens to generate).

        **Returns:**

        The cache.
        """
        prompt_len = prompt_mask.shape[1]
        pad = ((0, 0), (0, 0), (0, slots - prompt_len), (0, 0))

        def per_layer(stacked):
            return tuple(jnp.pad(layer.transpose(0, 2, 1, 3), pad) for layer in stacked)

        lengths = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)
        return KVCache(keys=per_layer(keys), values=per_layer(values), start=prompt_len - lengths)

    def repeat(self, group_size: int) -> "KVCache":
        """Each row's cache `group_size` times, consecutively (rows `p*G … p*G+G-1` copy row `p`):
        the cache of a group of completions of one prompt, prefilled once.

        **Arguments:**

        - `group_size`: copies of each row.

        **Returns:**

        The cache of `batch × group_size` rows.
        """

        def copies(layers):
            return tuple(jnp.repeat(layer, group_size, axis=0) for layer in layers)

        return KVCache(
            keys=copies(self.keys),
            values=copies(self.values),
            start=jnp.repeat(self.start, group_size, axis=0),
        )
