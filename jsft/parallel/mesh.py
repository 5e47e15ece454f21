"""The device mesh (data, fsdp, tensor, expert) from the config, and multi-process start-up.

`config.mesh.shape` gives the sizes of data, fsdp and tensor; one may be -1 ("the rest of the devices").
`config.mesh.expert` (default 1) is the expert-parallel axis, a field of its own so that 3-tuple shapes
stay valid: experts are split over it, and the batch too (it is a data axis for every other layer).
`config.mesh.dcn_shape` splits them between the slow network (DCN: across slices or nodes) and the
fast interconnect (ICI/NVLink) via `mesh_utils.create_hybrid_device_mesh`; all ones means one slice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

SHAPE_AXES = ("data", "fsdp", "tensor")  # sized by config.mesh.shape
AXES = (*SHAPE_AXES, "expert")  # every mesh axis; those after SHAPE_AXES have a config field each


def resolve_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Fill in one -1 so that the sizes multiply to `n_devices`; refuse shapes that cannot fit."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(SHAPE_AXES):
        raise ValueError(f"config.mesh.shape={shape} must name {len(SHAPE_AXES)} sizes for {SHAPE_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh.shape={shape}: sizes must be >= 1, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"config.mesh.shape={shape} cannot fill {n_devices} devices")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ValueError(f"config.mesh.shape={shape} needs {math.prod(shape)} devices; there are {n_devices}")
    return shape


def build_mesh(
    shape: Sequence[int],
    dcn_shape: Sequence[int] = (1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
    expert: int = 1,
) -> jax.sharding.Mesh:
    """The mesh over AXES: `shape` sizes data, fsdp and tensor, `expert` the expert axis (config.mesh.expert,
    within a slice: its all-to-alls stay on the fast interconnect)."""
    devices = list(jax.devices() if devices is None else devices)
    if expert < 1 or len(devices) % expert:
        raise ValueError(f"config.mesh.expert={expert} must be >= 1 and divide the {len(devices)} devices")
    dcn = (*(int(s) for s in dcn_shape), 1)
    total = (*resolve_shape(shape, len(devices) // expert), expert)
    if math.prod(dcn) > 1:
        if any(t % d for t, d in zip(total, dcn, strict=True)):
            raise ValueError(f"config.mesh.dcn_shape={dcn} must divide config.mesh.shape={total}")
        ici = tuple(t // d for t, d in zip(total, dcn, strict=True))
        # TPU slices are told apart by `slice_index`; GPU nodes by process (one process per node).
        by_process = not hasattr(devices[0], "slice_index")
        try:
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
        except ValueError:
            if devices[0].platform != "cpu":
                raise
            # Simulated CPU devices (tests, --mode plan) have no slices: the split only orders devices.
            grid = np.asarray(devices).reshape(total)
    else:
        try:
            grid = mesh_utils.create_device_mesh(total, devices)
        except (AssertionError, NotImplementedError, ValueError):  # e.g. CPU or odd topologies
            grid = np.asarray(devices).reshape(total)
    return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> bool:
    """Start JAX's multi-controller runtime when the run has several processes; True if it did.

    Explicit flags win; otherwise SLURM (several tasks) and Cloud TPU pods are detected by JAX itself.
    On CPU, collectives go through gloo.
    """
    explicit = num_processes > 1
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if not (explicit or slurm or tpu_pod):
        return False
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port:
            raise ValueError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            coordinator_bind_address=f"{host}:{port}" if host in ("127.0.0.1", "localhost") else None,
        )
    else:
        jax.distributed.initialize()
    return True
