"""LoRA adapters on the decoder's linear projections (Hu et al. 2021, as PEFT computes them).

A targeted projection `y = x Wᵀ` becomes `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with `A: [rank, in]`,
`B: [out, rank]` and `s = alpha / rank`; `A` starts as PEFT's Kaiming-uniform draw and `B` at
zero, so a fresh adapter computes exactly the base model. The adapters of every layer are
stacked along the layers' leading axis (`LoraAdapters` sits in `DecoderLayer.lora`) and scanned
with them; switching them off (`Decoder.adapters_off`) gives back the frozen base without a copy.
The training forward pass, the prefill and the decode loop all apply them factored (`x Aᵀ Bᵀ`,
in the compute dtype), so the sampler decodes the policy that is trained. The adapters and their
optimizer moments are float32 whatever the base's dtype (PEFT's default): a bfloat16 `A`
(entries about `1/√d`) would not move under Adam steps of 1e-4.
"""

import hashlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Key, PRNGKeyArray

from .config import ModelConfig

ADAPTER_DTYPE = jnp.float32
"""The adapters' parameter dtype, whatever the base model's."""

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections an adapter can sit on, by their Hugging Face module names."""


def resolve_targets(targets: "str | list[str] | tuple[str, ...]") -> tuple[str, ...]:
    """The projections named by `targets`, in `TARGETS` order.

    **Arguments:**

    - `targets`: `"all-linear"` (every projection but the LM head, as PEFT means it), or a list
      of module names.

    **Returns:**

    The module names.
    """
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ValueError(
                f'model.lora.targets: {targets!r} is neither "all-linear" nor a list of module '
                f"names; modules: {', '.join(TARGETS)}"
            )
        return TARGETS
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(
            f"model.lora.targets: {unknown[0]!r} matches no module; modules: {', '.join(TARGETS)}"
        )
    if not targets:
        raise ValueError(f"model.lora.targets is empty; modules: {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in targets)


class LoraPair(eqx.Module):
    """One projection's adapter, PEFT's `lora_A.weight` and `lora_B.weight` (stacked over layers
    in the decoder)."""

    a: Float[Array, "*layers rank fan_in"]
    b: Float[Array, "*layers fan_out rank"]


class LoraAdapters(eqx.Module):
    """The adapters of one (or, stacked along a leading axis, every) decoder layer: a `LoraPair`
    on each targeted projection, `None` on the others.

    **Fields:**

    - `q_proj` … `down_proj`: the adapters, by HF module name.
    - `rank`: `r`.
    - `alpha`: PEFT's `lora_alpha`; the update is scaled by `alpha / rank`.
    - `dropout`: PEFT's `lora_dropout`: the rate at which an adapter's inputs are zeroed (and
      the rest scaled by `1 / (1 - dropout)`) while `dropout_key` is set.
    - `dropout_key`: one PRNG key per layer, set only for the training objective
      (`Decoder.with_dropout`); `None`: no dropout (old and reference log-probs, sampling).
    """

    q_proj: LoraPair | None
    k_proj: LoraPair | None
    v_proj: LoraPair | None
    o_proj: LoraPair | None
    gate_proj: LoraPair | None
    up_proj: LoraPair | None
    down_proj: LoraPair | None
    rank: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    dropout: float = eqx.field(static=True, default=0.0)
    dropout_key: Key[Array, "*layers"] | None = None

    def __check_init__(self):
        if self.rank <= 0:
            raise ValueError(f"model.lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        """`alpha / rank`."""
        return self.alpha / self.rank

    @property
    def targets(self) -> tuple[str, ...]:
        """The projections that carry an adapter."""
        return tuple(t for t in TARGETS if getattr(self, t) is not None)

    @staticmethod
    def init(
        config: ModelConfig,
        rank: int,
        alpha: "float | int",
        targets: tuple[str, ...],
        *,
        dropout: float = 0.0,
        key: PRNGKeyArray,
    ) -> "LoraAdapters":
        """Fresh adapters for one layer: `A` uniform in `±1/√fan_in` (PEFT's Kaiming-uniform with
        `a = √5`), `B` zero.

        **Arguments:**

        - `config`: the model config (the projections' shapes).
        - `rank`: `r` (≥ 1).
        - `alpha`: the scale's numerator.
        - `targets`: the projections to adapt (`resolve_targets`).
        - `dropout`: the dropout rate of the adapters' inputs in training.
        - `key`: PRNG key.

        **Returns:**

        The `LoraAdapters` (in `ADAPTER_DTYPE`).
        """
        if rank <= 0:
            raise ValueError(f"model.lora.rank must be >= 1, got {rank}")
        shapes = projection_shapes(config)
        keys = dict(zip(TARGETS, jax.random.split(key, len(TARGETS)), strict=True))

        def pair(name):
            if name not in targets:
                return None
            fan_out, fan_in = shapes[name]
            bound = 1.0 / np.sqrt(fan_in)
            a = jax.random.uniform(keys[name], (rank, fan_in), ADAPTER_DTYPE, -bound, bound)
            return LoraPair(a=a, b=jnp.zeros((fan_out, rank), ADAPTER_DTYPE))

        return LoraAdapters(
            **{name: pair(name) for name in TARGETS},
            rank=rank,
            alpha=float(alpha),
            dropout=float(dropout),
        )

    def delta(
        self, name: str, x: Float[Array, "*batch fan_in"]
    ) -> Float[Array, "*batch fan_out"] | None:
        """`s · (dropout(x) Aᵀ) Bᵀ` of projection `name` in `x`'s dtype (`None` where it has no
        adapter).

        **Arguments:**

        - `name`: the projection.
        - `x`: its input.

        **Returns:**

        The update to add to the projection's output.
        """
        pair = getattr(self, name)
        if pair is None:
            return None
        if self.dropout_key is not None and self.dropout > 0:
            key = jax.random.fold_in(self.dropout_key, TARGETS.index(name))
            kept = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(kept, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros_like(x))
        down = jnp.einsum("...i,ri->...r", x, pair.a.astype(x.dtype))
        up = jnp.einsum("...r,or->...o", down, pair.b.astype(x.dtype))
        return up * jnp.asarray(self.scale, x.dtype)

    def merged(
        self,
        name: str,
        weight: Float[Array, "*layers out in"] | Float[np.ndarray, "*layers out in"],
    ) -> Float[Array, "*layers out in"] | Float[np.ndarray, "*layers out in"]:
        """`W + s · B A` of projection `name` in `W`'s dtype (the product in float32).

        **Arguments:**

        - `name`: the projection.
        - `weight`: its base weight (HF `[out, in]` layout; on the host or a device).

        **Returns:**

        The merged weight (`weight` itself where the projection has no adapter).
        """
        pair = getattr(self, name)
        if pair is None:
            return weight
        product = jnp.einsum(
            "...or,...ri->...oi",
            pair.b.astype(jnp.float32),
            pair.a.astype(jnp.float32),
            preferred_element_type=jnp.float32,
        )
        return (weight.astype(jnp.float32) + self.scale * product).astype(weight.dtype)


def adapted(
    lora: "LoraAdapters | None",
    name: str,
    x: Float[Array, "*batch fan_in"],
    y: Float[Array, "*batch fan_out"],
) -> Float[Array, "*batch fan_out"]:
    """A projection's output `y` plus its adapter term in `x` (`y` where it has none): the one
    way training, the prefill and the decode loop apply adapters.

    **Arguments:**

    - `lora`: the layer's adapters, or `None`.
    - `name`: the projection.
    - `x`: its input.
    - `y`: its base output (`x Wᵀ + bias`).

    **Returns:**

    `y + s · (x Aᵀ) Bᵀ`, or `y`.
    """
    delta = None if lora is None else lora.delta(name, x)
    return y if delta is None else y + delta


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Each projection's `(out, in)` shape.

    **Arguments:**

    - `config`: the model config.

    **Returns:**

    Module name → shape.
    """
    d, i = config.hidden_size, config.intermediate_size
    q_out = config.num_heads * config.head_dim
    kv_out = config.num_kv_heads * config.head_dim
    return {
        "q_proj": (q_out, d),
        "k_proj": (kv_out, d),
        "v_proj": (kv_out, d),
        "o_proj": (d, q_out),
        "gate_proj": (i, d),
        "up_proj": (i, d),
        "down_proj": (d, i),
    }


_PRIMES = (2654435761, 40503, 2246822519, 3266489917)


@jax.jit
def _checksums(arrays: list[Array]) -> list[Array]:
    """Position-weighted sums of each array's bit patterns, in wrapping uint32 arithmetic: exact,
    so the same on any mesh and any device."""
    sums = []
    for x in arrays:
        width = {4: jnp.uint32, 2: jnp.uint16}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
        weight = jnp.ones(x.shape, jnp.uint32)
        for axis in range(x.ndim):
            prime = jnp.uint32(_PRIMES[axis % len(_PRIMES)])
            weight = weight + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * prime
        sums.append(jnp.sum(bits * weight, dtype=jnp.uint32))
    return sums


def base_fingerprint(model) -> str:
    """A short digest of a model's weights (names, shapes, dtypes and every bit), computed on the
    devices where they are: what a LoRA checkpoint records of the base it belongs to.

    **Arguments:**

    - `model`: the base model (without adapters), or any pytree of arrays.

    **Returns:**

    16 hexadecimal digits.
    """
    leaves = [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(model)
        if eqx.is_inexact_array(leaf)
    ]
    sums = jax.device_get(_checksums([leaf for _, leaf in leaves]))
    digest = hashlib.sha256()
    for (name, leaf), total in zip(leaves, sums, strict=True):
        digest.update(f"{name}:{leaf.shape}:{leaf.dtype}:{int(total)};".encode())
    return digest.hexdigest()[:16]
