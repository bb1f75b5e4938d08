"""The prompt batch that enters a step."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


class Prompts(eqx.Module):
    """Left-padded prompt ids, their mask, and each prompt's index into the task's problem list.

    The index lets host-side rewards find the reference answer without strings entering `jit`.
    """

    ids: Int[Array, "prompts prompt_len"]
    mask: Bool[Array, "prompts prompt_len"]
    index: Int[Array, " prompts"]

    def repeat(self, group_size: int) -> "Prompts":
        """Each prompt `group_size` times, consecutively (rows `g*G … g*G+G-1` share prompt `g`).

        **Arguments:**

        - `group_size`: samples per prompt.

        **Returns:**

        The repeated `Prompts`.
        """
        return Prompts(
            ids=jnp.repeat(self.ids, group_size, axis=0),
            mask=jnp.repeat(self.mask, group_size, axis=0),
            index=jnp.repeat(self.index, group_size, axis=0),
        )

    def take(self, rows: Int[Array, " rows"]) -> "Prompts":
        """The prompts at `rows`.

        **Arguments:**

        - `rows`: row indices.

        **Returns:**

        The selected `Prompts`.
        """
        return Prompts(ids=self.ids[rows], mask=self.mask[rows], index=self.index[rows])
