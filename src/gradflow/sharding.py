"""Device mesh and partition rules: axes `data`, `fsdp`, `tensor` (`[mesh]`, -1 = the rest).

The batch (prompts, completions, the update batch) is split over `data × fsdp`. Parameters are
split FSDP-style over `fsdp` and Megatron-style over `tensor` (attention weights only in whole
heads):

| parameter | layout | spec |
|---|---|---|
| `q/k/v_proj`, `gate/up_proj` | `[layers, out, in]` | `(None, tensor, fsdp)` |
| `o_proj`, `down_proj` | `[layers, hidden, in]` | `(None, fsdp, tensor)` |
| `embed`, `lm_head` | `[vocab, hidden]` | `(tensor, fsdp)` |
| `q/k/v_bias` | `[layers, out]` | `(None, tensor)` |
| norms, the critic's head, counters, keys | | replicated |

A rule is looked up by the leaf's last attribute name, so it applies wherever that weight sits in
the train state: the policy, the frozen reference, the critic's backbone and the optimizer's
moments (optax keeps `mu`/`nu` as trees shaped like the parameters). A dimension that does not
divide by its axis size stays unsplit. Arrays are placed with `jax.make_array_from_callback`
from host data that every process holds, so the same code builds global arrays on one host or
many.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import ConfigError, MeshConfig
from .models import Decoder

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Leaf name → mesh axis of each trailing dimension (leading dimensions, e.g. layers, unsplit).
RULES: dict[str, tuple[str | None, ...]] = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), ("tensor", "fsdp")),
    **dict.fromkeys(("o_proj", "down_proj"), ("fsdp", "tensor")),
    **dict.fromkeys(("embed", "lm_head"), ("tensor", "fsdp")),
    **dict.fromkeys(("q_bias", "k_bias", "v_bias"), ("tensor",)),
}


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: all, on every process) with the configured axis sizes.

    **Arguments:**

    - `config`: `[mesh]`.
    - `devices`: the devices to use.

    **Returns:**

    The `Mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("at most one [mesh] axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        named = dict(zip(AXES, sizes, strict=True))
        raise ConfigError(f"[mesh] axis sizes must be >= 1 or -1, got {named}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(
                f"{len(devices)} devices do not divide by the fixed [mesh] axes ({known})"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
            f"have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_size_divisor(mesh: Mesh) -> int:
    """The number of batch shards, `data × fsdp`.

    **Arguments:**

    - `mesh`: the mesh.

    **Returns:**

    `mesh.shape["data"] * mesh.shape["fsdp"]`.
    """
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(prompts_per_step: int, group_size: int, mesh: Mesh) -> None:
    """Raises a `ConfigError` unless a step's sequences split evenly over `data × fsdp`.

    **Arguments:**

    - `prompts_per_step`: `train.prompts_per_step`.
    - `group_size`: completions per prompt.
    - `mesh`: the mesh.

    **Returns:**

    Nothing.
    """
    shards = batch_size_divisor(mesh)
    rows = prompts_per_step * group_size
    if rows % shards:
        raise ConfigError(
            f"train.prompts_per_step × algorithm.group_size = {prompts_per_step} × {group_size} "
            f"= {rows} sequences do not divide over mesh.data × mesh.fsdp = "
            f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {shards} devices; use a multiple of "
            f"{shards} sequences per step or a smaller mesh"
        )


# Leaf name → the trailing dimension (index into its rule) that holds whole attention heads: its
# `tensor` split must not cut a head (RoPE rotates the two halves of each head together).
HEAD_DIMENSIONS: dict[str, int] = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias"), 0),
    "o_proj": 1,
}


def _fit(
    spec: tuple[str | tuple[str, ...] | None, ...], shape, mesh: Mesh, units=None
) -> PartitionSpec:
    """`spec` with every axis that does not divide its dimension (counted in `units`, e.g.
    heads of `head_dim` entries) dropped."""
    fitted = []
    units = units or (1,) * len(shape)
    for size, axis, unit in zip(shape, spec, units, strict=True):
        names = (axis,) if isinstance(axis, str) else axis or ()
        shards = int(np.prod([mesh.shape[a] for a in names]))
        whole = size % unit == 0 and (size // unit) % shards == 0
        fitted.append(axis if axis is not None and whole else None)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return PartitionSpec(*fitted)


def _leaf_name(path) -> str:
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.GetAttrKey):
            return entry.name
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
    return ""


def param_spec(
    path, shape: tuple[int, ...], mesh: Mesh, head_dim: int | None = None
) -> PartitionSpec:
    """The partition spec of one state leaf, from its key path and shape.

    **Arguments:**

    - `path`: the leaf's key path (`jax.tree_util.tree_flatten_with_path`).
    - `shape`: its shape.
    - `mesh`: the mesh.
    - `head_dim`: the model's head size: attention weights are split over `tensor` only in
      whole heads (`None`: any split that divides).

    **Returns:**

    The `PartitionSpec` (replicated when no rule applies).
    """
    name = _leaf_name(path)
    rule = RULES.get(name)
    if rule is None or len(shape) < len(rule):
        return PartitionSpec()
    lead = len(shape) - len(rule)
    spec = (None,) * lead + rule
    units = [1] * len(shape)
    if head_dim is not None and name in HEAD_DIMENSIONS:
        units[lead + HEAD_DIMENSIONS[name]] = head_dim
    return _fit(spec, shape, mesh, units)


def _head_dim(tree) -> int | None:
    """The head size of the decoders in `tree` (policy, reference, critic backbone and the
    optimizer moments shaped like them), or `None` when it holds none."""
    found = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Decoder))
    sizes = {x.config.head_dim for x in found if isinstance(x, Decoder)}
    return sizes.pop() if len(sizes) == 1 else None


def state_shardings(tree, mesh: Mesh):
    """The `NamedSharding` of every array leaf of a train state (or a policy, or any part).

    **Arguments:**

    - `tree`: the pytree (arrays, tracers or `jax.ShapeDtypeStruct`s; `None` stays `None`).
    - `mesh`: the mesh.

    **Returns:**

    A pytree of `NamedSharding` with `tree`'s structure.
    """
    head_dim = _head_dim(tree)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(path, jnp.shape(leaf), mesh, head_dim)),
        tree,
    )


def rows_spec(shape: tuple[int, ...], mesh: Mesh, axis: int = 0) -> PartitionSpec:
    """Dimension `axis` split over `data × fsdp` when it divides, everything else unsplit.

    **Arguments:**

    - `shape`: the array's shape.
    - `mesh`: the mesh.
    - `axis`: the batch dimension.

    **Returns:**

    The `PartitionSpec`.
    """
    if len(shape) <= axis:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[axis] = BATCH_AXES
    return _fit(tuple(spec), shape, mesh)


def constrain_rows(tree, mesh: Mesh | None, axis: int = 0):
    """Inside `jit`: every array of `tree` split over `data × fsdp` along `axis` (a no-op
    without a mesh).

    **Arguments:**

    - `tree`: arrays whose dimension `axis` is the batch.
    - `mesh`: the mesh, or `None`.
    - `axis`: the batch dimension.

    **Returns:**

    `tree`, constrained.
    """
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, rows_spec(x.shape, mesh, axis))
        ),
        tree,
    )


def constrain_replicated(tree, mesh: Mesh | None):
    """Inside `jit`: every array of `tree` on every device (a no-op without a mesh).

    **Arguments:**

    - `tree`: arrays.
    - `mesh`: the mesh, or `None`.

    **Returns:**

    `tree`, constrained.
    """
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def constrain_state(state, mesh: Mesh | None):
    """Inside `jit`: the train state laid out by the partition rules (a no-op without a mesh).

    **Arguments:**

    - `state`: the train state (or any part of it).
    - `mesh`: the mesh, or `None`.

    **Returns:**

    `state`, constrained.
    """
    if mesh is None:
        return state
    return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh))


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def put(value, sharding: NamedSharding) -> jax.Array:
    """Places one array with `sharding`, on one process or many.

    An array already laid out that way is returned as is; on one process, or for an array that
    already spans processes, it is moved with `jax.device_put`; anything else (numpy, or a
    process-local array holding the same value on every process) is cut into the shards this
    process holds.

    **Arguments:**

    - `value`: an array (a PRNG key array too).
    - `sharding`: where it goes.

    **Returns:**

    The global `jax.Array`.
    """
    if isinstance(value, jax.Array):
        if value.sharding == sharding:
            return value
        if jax.process_count() == 1 or not value.is_fully_addressable:
            return jax.device_put(value, sharding)
    if _is_key(value):
        data = put(jax.random.key_data(value), NamedSharding(sharding.mesh, PartitionSpec()))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state, mesh: Mesh):
    """The train state (or a policy, or any part of it) laid out on `mesh` by the partition rules.

    **Arguments:**

    - `state`: the pytree; every process passes the same values.
    - `mesh`: the mesh.

    **Returns:**

    The same pytree of global arrays.
    """
    return jax.tree.map(put, state, state_shardings(state, mesh))


def shard_prompts(prompts, mesh: Mesh):
    """A step's prompt batch as global arrays: rows over `data × fsdp` when they divide, else
    replicated (the step splits the `prompts × group_size` sequences either way).

    **Arguments:**

    - `prompts`: the `Prompts` (host or process-local arrays; every process passes the same).
    - `mesh`: the mesh.

    **Returns:**

    The `Prompts` of global arrays.
    """
    return jax.tree.map(lambda x: put(x, NamedSharding(mesh, rows_spec(x.shape, mesh))), prompts)
