"""Rotary position embeddings (RoPE), with the `linear` and `llama3` frequency scalings."""

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .config import ModelConfig


def inverse_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies, scaled as the config's `rope_type` says (computed on the host).

    **Arguments:**

    - `config`: the model config.
    - `local`: those of sliding-window layers instead (default RoPE with base
      `rope_local_theta`; Gemma 3).

    **Returns:**

    A float64 numpy array of shape `(head_dim // 2,)`.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    if local and config.rope_local_theta is not None:
        return 1.0 / (config.rope_local_theta**exponents)
    inv = 1.0 / (config.rope_theta**exponents)
    params = dict(config.rope_scaling)
    if config.rope_type == "linear":
        inv = inv / params["factor"]
    elif config.rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv


def rotary_tables(
    config: ModelConfig, positions: Int[Array, "*batch"], local: bool = False
) -> tuple[Float[Array, "*batch head_dim"], Float[Array, "*batch head_dim"]]:
    """The cosine and sine tables for the given positions (float32).

    **Arguments:**

    - `config`: the model config.
    - `positions`: the position of each token.
    - `local`: the tables of sliding-window layers (see `inverse_frequencies`).

    **Returns:**

    `(cos, sin)`, each of shape `(*batch, head_dim)`.
    """
    inv = jnp.asarray(inverse_frequencies(config, local), dtype=jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: Float[Array, "*batch heads head_dim"],
    cos: Float[Array, "*batch head_dim"],
    sin: Float[Array, "*batch head_dim"],
) -> Float[Array, "*batch heads head_dim"]:
    """Rotates query or key vectors (HF's `rotate_half` convention), in float32.

    **Arguments:**

    - `x`: queries or keys.
    - `cos`, `sin`: the tables from `rotary_tables`.

    **Returns:**

    The rotated vectors, in `x`'s dtype.
    """
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[..., None, :] + rotated * sin[..., None, :]
    return out.astype(x.dtype)
