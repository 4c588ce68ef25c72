"""Multi-process runs: start-up under Slurm / TPU pods / Ray / explicit flags, one writer, host <-> global arrays.

Every process runs the same program on its local devices (SPMD); a `jax.sharding.Mesh` over
`jax.devices()` (all processes' devices) makes the sweep, attack and train step one global computation
(`lvs_jax.core.sharding`). What this module adds:

  initialize()          `jax.distributed.initialize` when the run is multi-process: auto-detected under
                        Slurm (an srun step with SLURM_NTASKS > 1) and on Cloud TPU VM pod slices, or
                        from explicit LVS_COORDINATOR / LVS_NUM_PROCESSES / LVS_PROCESS_ID (tests, Ray,
                        hand-launched jobs); a no-op on one process. Returns whether it initialized.
  is_writer()           True on process 0 only: the one process that writes reports, caches and
                        commit records into the workdir (checkpoint shards are written by orbax,
                        which coordinates the processes itself).
  barrier(name)         every process waits here (no-op on one process).
  host_to_global(x, s)  a global jax.Array with sharding `s` from a host numpy array that every
                        process holds (each process copies only its own shards: no full copy on one
                        device).
  to_host(x)            the full value of a (possibly multi-process) jax.Array as numpy, on every process.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np

_INITIALIZED = False


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


def cluster_kind() -> str | None:
  """Which multi-process environment this process runs in: "explicit" (LVS_COORDINATOR set), "slurm"
  (an srun step with SLURM_NTASKS > 1, one task per GPU), "tpu" (Cloud TPU VM pod slice) or None."""
  if os.environ.get("LVS_COORDINATOR"):
    return "explicit"
  if (_env_int("SLURM_NTASKS") or 1) > 1 and os.environ.get("SLURM_STEP_ID") is not None:
    return "slurm"
  if os.environ.get("TPU_WORKER_HOSTNAMES") and "," in os.environ["TPU_WORKER_HOSTNAMES"]:
    return "tpu"
  return None


def initialize(force: bool = False) -> bool:
  """Starts jax.distributed when this is a multi-process run (see `cluster_kind`), or always when `force`
  (then JAX's own cluster auto-detection decides). Must run before any JAX computation.

  Explicit mode (tests, launch/ray_launch.py, hand-launched jobs): LVS_COORDINATOR=host:port, LVS_NUM_PROCESSES,
  LVS_PROCESS_ID and optionally LVS_LOCAL_DEVICE_IDS (comma-separated). Under Slurm and on TPU VMs
  JAX reads the cluster itself (jax's SlurmCluster / GkeTpuCluster / TpuCluster auto-detection).
  """
  global _INITIALIZED
  if _INITIALIZED:
    return True
  kind = cluster_kind()
  if kind is None and not force:
    return False
  # CPU processes (tests, CPU clusters) need a cross-process collectives backend; no effect on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if kind == "explicit":
    coord = os.environ["LVS_COORDINATOR"]
    n, pid = _env_int("LVS_NUM_PROCESSES"), _env_int("LVS_PROCESS_ID")
    if n is None or pid is None:
      raise ValueError(f"LVS_COORDINATOR={coord} needs LVS_NUM_PROCESSES and LVS_PROCESS_ID (got {n}, {pid})")
    ids = os.environ.get("LVS_LOCAL_DEVICE_IDS")
    local = [int(i) for i in ids.split(",")] if ids else None
    jax.distributed.initialize(coord, num_processes=n, process_id=pid, local_device_ids=local)
  else:
    jax.distributed.initialize()
  _INITIALIZED = True
  return True


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_writer() -> bool:
  """True on the one process that writes into the workdir (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Blocks until every process reaches the barrier `name` (no-op on one process)."""
  if is_multiprocess():
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def writer_section(name: str):
  """`with writer_section("report"): if is_writer(): write(...)` -- every process leaves the block only
  after the writer finished, so readers on other processes see the file."""
  try:
    yield is_writer()
  finally:
    barrier(f"lvs_writer_section:{name}")


def host_to_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global jax.Array of the host array `x` (identical on every process) laid out by `sharding`.

  Each process copies only the shards its own devices hold (`jax.make_array_from_callback`), so a 7B
  weight goes from host memory straight into its FSDP shards; nothing is first gathered on one device.
  """
  x = np.asarray(x) if not isinstance(x, np.ndarray) else x
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.array(x[idx]))


def to_host(x) -> np.ndarray:
  """numpy value of a jax.Array on every process; gathers shards that live on other processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tree_to_host(tree):
  return jax.tree.map(to_host, tree)


def agree(flag: bool) -> bool:
  """Process 0's value of `flag` on every process (no-op on one process): one decision for all, e.g.
  whether a resumable cache file exists, so every process takes the same branch (and the same
  collectives) even when their file-system views differ for a moment."""
  if not is_multiprocess():
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))
