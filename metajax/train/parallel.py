"""Data parallelism: the task axis of a meta-batch (or the seeds of continual runs) sharded
over every device of every process, with JAX's own sharding and distributed runtime.

A meta-batch of tasks is embarrassingly parallel. With a mesh of ``D`` devices, device ``d``
samples and differentiates tasks ``d * B/D ... (d + 1) * B/D - 1`` of the global batch of
``B`` and the meta-gradients (and metrics) are averaged across devices with one
``lax.pmean``; parameters and optimiser state are replicated, so the optimiser update runs
everywhere and no device ever holds another's tasks. Task ``i`` of meta-step ``s`` is always
drawn from ``fold_in(fold_in(key, s), i)``: the global meta-batch is the same set of tasks
whatever the number of devices, and so is the result, up to the order of a float sum.

The pieces are built on ``jax.sharding`` (:class:`~jax.sharding.Mesh`,
:class:`~jax.sharding.NamedSharding`, :class:`~jax.sharding.PartitionSpec`) and
``jax.shard_map``; ``jax.pmap`` is JAX's legacy form and is not used. Several hosts join
through :func:`initialize_distributed` (``jax.distributed.initialize``); the mesh then spans
the devices of all processes and every process runs the same program on its own tasks.

Inside each device's shard the task axis runs as the learner's ``task_map`` says (``vmap``,
``scan`` or chunks: :mod:`metajax.task_map`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metajax.task_map import check_divisible, sharded_map  # noqa: F401 - re-exported
from metajax.types import Learner, PyTree, Task

TASK_AXIS = "tasks"
"""The name of the mesh axis the task (or seed) axis is sharded over."""


def device_mesh(num_devices: int | None = None, axis: str = TASK_AXIS) -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices (all of them by default).

    With several processes (:func:`initialize_distributed`) the mesh spans every process's
    devices, and ``num_devices`` must be None or their total: each process must own a part
    of the mesh.

    The mesh's axis is of JAX's ``Auto`` type (``jax.make_mesh`` would make it ``Explicit``,
    on which ``shard_map`` of unsharded inputs fails).
    """
    devices = jax.devices()
    if num_devices is not None:
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"num_devices must be an int >= 1, got {num_devices!r}")
        if num_devices > len(devices):
            raise ValueError(
                f"{num_devices} devices asked for, but this run sees {len(devices)} "
                f"({devices[0].platform}); ask for at most {len(devices)}")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(
                f"with {jax.process_count()} processes the mesh must hold all "
                f"{len(devices)} devices (every process its own); got num_devices={num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (axis,))


def choose_devices(what: str, size: int, requested: int = 0) -> int:
    """How many devices to spread ``size`` items (tasks of a meta-batch, seeds) over.

    ``requested`` > 0 is taken as given, once it is checked to be at most the visible
    devices and to divide ``size`` (``ValueError`` naming the nearest sizes otherwise).
    ``requested == 0`` picks the most visible devices that divide ``size``; with several
    processes every device must take part, so then ``size`` must be a multiple of all.
    """
    available = jax.device_count()
    if requested:
        if requested > available:
            raise ValueError(f"devices={requested}, but this run sees {available} "
                             f"({jax.default_backend()}); use at most {available}")
        if jax.process_count() > 1 and requested != available:
            raise ValueError(f"with {jax.process_count()} processes every one of the "
                             f"{available} devices takes part: devices must be 0 or "
                             f"{available}, got {requested}")
        check_divisible(what, size, requested)
        return requested
    if jax.process_count() > 1:
        check_divisible(what, size, available)
        return available
    return max(d for d in range(1, available + 1) if size % d == 0)


def mesh_record(mesh: Mesh | None) -> dict[str, Any]:
    """What a run reports of its mesh: ``devices``, ``processes``, ``platform`` and the axis
    (``{"devices": 1, ...}`` without a mesh)."""
    if mesh is None:
        return {"devices": 1, "processes": jax.process_count(),
                "platform": jax.default_backend(), "axis": None}
    devices = mesh.devices.reshape(-1)
    return {"devices": int(devices.size),
            "processes": len({d.process_index for d in devices}),
            "platform": devices[0].platform, "axis": mesh.axis_names[0]}


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device of ``mesh`` holds whole."""
    return NamedSharding(mesh, P())


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """``tree`` placed whole on every device of ``mesh`` (unchanged without a mesh).

    With several processes every process must pass the same values (they do when they are
    computed from the same seed)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))


def sample_task_batch(sample_task: Callable[[jax.Array], Task], key: jax.Array,
                      first: Any, count: int) -> Task:
    """Tasks ``first ... first + count - 1`` of the meta-batch of ``key``: task ``i`` is
    ``sample_task(fold_in(key, i))``, stacked on a leading task axis (``vmap``)."""
    ids = first + jnp.arange(count, dtype=jnp.int32)
    return jax.vmap(lambda i: sample_task(jax.random.fold_in(key, i)))(ids)


def task_parallel_meta_grad(
    learner: Learner,
    sample_task: Callable[[jax.Array], Task],
    meta_batch_size: int,
    mesh: Mesh | None = None,
) -> Callable[[PyTree, jax.Array, Any], tuple[PyTree, dict]]:
    """``meta_grad(meta_params, key, step) -> (grads, metrics)`` over a meta-batch of
    ``meta_batch_size`` tasks drawn by ``sample_task`` from ``key`` (task ``i`` from
    ``fold_in(key, i)``).

    Without ``mesh`` the whole batch is sampled and differentiated on one device. With a
    ``mesh`` (:func:`device_mesh`) each device samples and differentiates its own contiguous
    share of the batch (``shard_map``) and the per-device means are averaged with
    ``lax.pmean``: equal shares make that the mean over the whole batch. ``meta_params``,
    ``key`` and ``step`` are replicated; so are the results.

    Raises:
      ValueError: ``meta_batch_size`` is not a multiple of the mesh's device count (before
        anything is compiled).
    """
    if mesh is None:
        def meta_grad(meta_params, key, step):
            tasks = sample_task_batch(sample_task, key, 0, meta_batch_size)
            return learner.meta_grad(meta_params, tasks, step=step)

        return meta_grad

    (axis,) = mesh.axis_names
    check_divisible("meta_batch_size", meta_batch_size, mesh.size)
    per_device = meta_batch_size // mesh.size

    def local(meta_params, key, step):
        first = jax.lax.axis_index(axis) * per_device
        tasks = sample_task_batch(sample_task, key, first, per_device)
        grads, metrics = learner.meta_grad(meta_params, tasks, step=step)
        return jax.lax.pmean((grads, metrics), axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P()),
                         check_vma=False)


def _wait_for(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no coordinator answered at {address} within {timeout_s:g} s ({err}); "
                    "start process 0 (--process-id 0) on that host first, and check the "
                    "address, the port and the firewall") from None
            time.sleep(0.2)


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = 300.0,
) -> dict[str, int]:
    """Join a multi-process run through ``jax.distributed.initialize``.

    With ``coordinator="HOST:PORT"``, ``num_processes`` and ``process_id`` given, process 0
    serves as the coordinator on that address and the others connect to it. With none of
    them, JAX reads the cluster from the environment where it knows it (SLURM's
    ``SLURM_*`` variables, Cloud TPU's metadata, Open MPI, Kubernetes JobSets...).

    A process other than 0 first waits up to ``timeout_s`` for the coordinator's port to
    answer and raises ``TimeoutError`` naming it when it does not (JAX itself would abort the
    process); the coordinator waits up to ``timeout_s`` for every process to join.

    Returns ``{"process_id", "processes", "devices", "local_devices"}``.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("give --coordinator, --num-processes and --process-id together "
                         "(or none of them, to read the cluster from the environment)")
    if all(given):
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) \
                or num_processes < 1:
            raise ValueError(f"--num-processes must be an int >= 1, got {num_processes!r}")
        if isinstance(process_id, bool) or not isinstance(process_id, int) \
                or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, {num_processes - 1}], got "
                             f"{process_id!r}")
        if process_id != 0:
            _wait_for(coordinator, timeout_s)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=max(int(timeout_s), 1))
    return {"process_id": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count()}


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs and files."""
    return jax.process_index() == 0
