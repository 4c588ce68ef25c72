"""Child process of tests/test_checkpoints.py: a tiny LoRA run that resumes from its workdir.

  python tests/train_child.py WORKDIR NUM_STEPS

Writes WORKDIR/metrics.jsonl, WORKDIR/checkpoints/ and, when done, WORKDIR/final.npz (every leaf of
the final TrainState). Fault injection (SIGKILL of itself), by environment variable:
  LVS_KILL_IN_ORBAX_FINALIZE=s   while saving step s, after orbax wrote its temporary directory and
                                 before orbax renames it into place;
  LVS_KILL_BEFORE_COMMIT=s       while saving step s, after orbax's rename and before lvs_commit.json.
"""

import os
import signal
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import TINY  # noqa: E402

from lvs_jax.core import model as model_lib  # noqa: E402
from lvs_jax.core.config import ModelConfig  # noqa: E402
from lvs_jax.io import checkpoints  # noqa: E402
from lvs_jax.training import core as training  # noqa: E402
from lvs_jax.training import lora  # noqa: E402


def _die():
  print("SELF-KILL", flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


def _install_faults():
  s = os.environ.get("LVS_KILL_IN_ORBAX_FINALIZE")
  if s:
    from orbax.checkpoint._src.path import atomicity

    cls = atomicity.AtomicRenameTemporaryPath
    orig = cls.finalize

    async def finalize(self, *a, **k):
      if os.path.basename(str(self._final_path)) == s:
        _die()
      return await orig(self, *a, **k)

    cls.finalize = finalize
  c = os.environ.get("LVS_KILL_BEFORE_COMMIT")
  if c:
    orig_commit = checkpoints.write_commit

    def write_commit(step_dir, step):
      if step == int(c):
        _die()
      return orig_commit(step_dir, step)

    checkpoints.write_commit = write_commit


def main(workdir: str, num_steps: int) -> None:
  cfg = ModelConfig(arch="llama", **TINY)
  params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(0))  # one compile, not one per op
  rng = np.random.default_rng(0)
  exs = [training.Tokenized(rng.integers(3, cfg.vocab_size, int(rng.integers(6, 20))).astype(np.int32),
                            int(rng.integers(2, 5))) for _ in range(24)]
  ds = training.Dataset(exs, batch_size=2, micro_batches=2, seq_len=32, pad_id=0, seed=1, packing=True)
  sched = training.make_schedule(1e-2, num_steps, 3)
  opt = training.make_optimizer(sched, weight_decay=0.01)
  state = training.init_state(lora.init(jax.random.key(0), cfg, 4, 8), opt, seed=0)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=2,
                                  metadata=dict(data_hash=ds.fingerprint()), log=lambda m: print("CKPT", m, flush=True))
  restored = ckpt.restore_latest(checkpoints.abstract_like(state), expect=dict(data_hash=ds.fingerprint()))
  if restored is not None:
    state = restored[0]
    print("RESUMED", int(state.step), flush=True)
  _install_faults()
  step = training.make_train_step(cfg, opt, params, schedule=sched, remat=False)
  state, _ = training.train_loop(state, step, ds, num_steps, checkpointer=ckpt,
                                 metrics_path=os.path.join(workdir, "metrics.jsonl"), log=None)
  np.savez(os.path.join(workdir, "final.npz"), *[np.asarray(x) for x in jax.tree.leaves(state)])
  print("DONE", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
