"""Child process of tests/test_distributed.py: a smoke sweep and a few FSDP train steps on a global mesh.

  python tests/dist_child.py WORKDIR WRITE_LOG

One process (no LVS_COORDINATOR: the single-process reference) or one of several started with
LVS_COORDINATOR / LVS_NUM_PROCESSES / LVS_PROCESS_ID (`lvs_jax.core.distributed.initialize`), one CPU
device each; the mesh spans every process's devices. Outputs, written by the writer process only:
WORKDIR/sweep.npz, WORKDIR/final.npz (every leaf of the final TrainState), WORKDIR/metrics.jsonl and
WORKDIR/checkpoints/ (orbax, with our commit record). Every file-system write this process makes from
Python (an audit hook: open for writing, mkdir, rename/replace, remove) is appended to WRITE_LOG,
which the test reads to check that only process 0 wrote into WORKDIR.
"""

import os
import sys

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.move", "shutil.rmtree",
                "os.truncate"}


def _install_write_log(path: str) -> None:
  log = open(path, "a", buffering=1)  # noqa: SIM115 -- open for the life of the process

  def hook(event, args):
    if event == "open":
      name, mode = args[0], args[1]
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      if writing and isinstance(name, (str, bytes, os.PathLike)):
        log.write(f"open\t{os.fsdecode(name)}\n")
    elif event in WRITE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
      log.write(f"{event}\t{os.fsdecode(args[0])}\n")

  sys.addaudithook(hook)


def main(workdir: str, write_log: str) -> None:
  _install_write_log(write_log)
  import jax

  from lvs_jax.core import distributed

  distributed.initialize()
  import numpy as np

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from helpers import TINY

  from lvs_jax.core import model as model_lib
  from lvs_jax.core import sharding
  from lvs_jax.core.config import ModelConfig
  from lvs_jax.io import checkpoints, files, keys
  from lvs_jax.lvs import sweeps
  from lvs_jax.training import core as training

  jax.config.update("jax_default_matmul_precision", "highest")
  n = jax.device_count()
  mesh = sharding.make_mesh(data=n)
  cfg = ModelConfig(arch="llama", **TINY)
  # Every process builds the same host weights; each device then receives only its own FSDP shard.
  with jax.default_device(jax.local_devices()[0]):  # a local computation on each process
    host = jax.tree.map(np.asarray, jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(0)))
  params = sharding.place_params(host, cfg, mesh, sharding.FSDP)

  # Smoke sweep: 4 prompts over the "data" axis.
  rng = np.random.RandomState(0)
  B, tp, tt = 4, 8, 3
  toks = rng.randint(3, cfg.vocab_size, (B, tp + tt)).astype(np.int32)
  pm = np.ones((B, tp), np.int32)
  pm[1, :2] = 0
  tm = np.ones((B, tt), np.int32)
  batch = sweeps.SweepBatch(toks, np.concatenate([pm, tm], 1), np.concatenate([pm, 0 * tm], 1), tm, tp)
  dirs = np.eye(cfg.d_model, dtype=np.float32)[:2]
  res = sharding.sweep(params, cfg, batch, np.array([1, 2]), np.array([0.0, 0.5]), dirs, np.array([5, 7]), mesh,
                       chunk=2)
  # Every process runs the library's resumable-cache code; only process 0 writes (io.files, io.keys hooks).
  path = os.path.join(workdir, "sweep.npz")
  if not keys.claim(path, "sweep", prompts=B):
    files.atomic_savez(path, **res)
  distributed.barrier("sweep_written")
  assert keys.claim(path, "sweep", prompts=B)  # every process now sees the cache

  # A few full fine-tuning steps, FSDP state, through the library's train loop and Checkpointer.
  exs = [training.Tokenized(rng.randint(3, cfg.vocab_size, int(rng.randint(6, 14))).astype(np.int32),
                            int(rng.randint(2, 4))) for _ in range(16)]
  ds = training.Dataset(exs, batch_size=4, micro_batches=1, seq_len=16, pad_id=0, seed=1)
  opt = training.make_optimizer(1e-2)
  state0 = training.init_state(host, opt)
  sh = sharding.state_shardings(state0, cfg, mesh, sharding.FSDP)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=2)
  restored = ckpt.restore_latest(sharding.with_shardings(state0, sh))
  state = restored[0] if restored else sharding.place_state(state0, sh)
  step = sharding.make_train_step(cfg, opt, mesh, sh, remat=False)
  state, _ = training.train_loop(state, step, ds, 3, checkpointer=ckpt, log=None, progress=False,
                                 metrics_path=os.path.join(workdir, "metrics.jsonl"))
  leaves = [distributed.to_host(x) for x in jax.tree.leaves(state)]
  with distributed.writer_section("final") as writer:
    if writer:
      np.savez(os.path.join(workdir, "final.npz"), *leaves)
  print("DONE", jax.process_index(), n, flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
