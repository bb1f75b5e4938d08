"""PPO's critic: a decoder backbone with a scalar value head."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .models import Decoder
from .packing import Packing, pack, packed_hidden


class Critic(eqx.Module):
    """`V(prefix)` for every completion position: backbone hidden state → linear → scalar.

    By default the backbone starts as a copy of the policy and the head at zero (so the first
    values are 0), as verl and OpenRLHF initialise it from the actor.
    """

    backbone: Decoder
    head: Float[Array, " hidden"]
    bias: Float[Array, ""]

    @staticmethod
    def from_policy(policy: Decoder) -> "Critic":
        """A critic whose backbone is a copy of `policy` and whose head is zero.

        **Arguments:**

        - `policy`: the policy model.

        **Returns:**

        The `Critic`.
        """
        dtype = policy.embed.dtype
        return Critic(
            backbone=policy,
            head=jnp.zeros((policy.config.hidden_size,), dtype),
            bias=jnp.zeros((), jnp.float32),
        )

    def values(
        self,
        input_ids: Int[Array, "batch total"],
        attention_mask: Bool[Array, "batch total"] | Int[Array, "batch total"],
        prompt_len: int,
        packing: Packing | None = None,
    ) -> Float[Array, "batch new"]:
        """The value before each completion token (slot `t-1` values token `t`'s state), float32.

        **Arguments:**

        - `input_ids`: prompt + completion ids.
        - `attention_mask`: 1 on real tokens.
        - `prompt_len`: number of prompt slots.
        - `packing`: run the backbone on packed rows (`gradflow.packing`; `None`: the padded
          rows as given); the values at positions without a completion token are then 0.

        **Returns:**

        Values of shape `(batch, total - prompt_len)`.
        """
        if packing is not None:
            packed = pack(input_ids, attention_mask, prompt_len, packing)
            hidden = packed_hidden(
                lambda ids, seg, prefixes, positions, _block: self.backbone.hidden_states(
                    ids, seg > 0, segment_ids=seg, prefix_ids=prefixes, positions=positions
                ),
                packed,
            )
            return jnp.where(packed.present, self._head(hidden), 0.0)
        hidden = self.backbone.hidden_states(input_ids, attention_mask)[:, prompt_len - 1 : -1]
        return self._head(hidden)

    def _head(self, hidden: Float[Array, "batch n hidden"]) -> Float[Array, "batch n"]:
        head = self.head.astype(hidden.dtype)
        values = jnp.einsum("bnd,d->bn", hidden, head, preferred_element_type=jnp.float32)
        return values + self.bias
