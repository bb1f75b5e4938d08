"""Device mesh for the step: axes `data`, `fsdp`, `tensor` (`[mesh]`, -1 = the rest)."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import MeshConfig

AXES = ("data", "fsdp", "tensor")


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with the configured axis sizes.

    **Arguments:**

    - `config`: `[mesh]`.
    - `devices`: the devices to use.

    **Returns:**

    The `Mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one [mesh] axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over `data × fsdp`.

    **Arguments:**

    - `mesh`: the mesh.

    **Returns:**

    The sharding for arrays whose first axis is the batch.
    """
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array.

    **Arguments:**

    - `mesh`: the mesh.

    **Returns:**

    The replicated sharding.
    """
    return NamedSharding(mesh, PartitionSpec())
