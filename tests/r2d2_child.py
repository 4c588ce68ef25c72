"""Child process of tests/test_r2d2.py: a tiny R2D2 run (tiny chat model) that resumes from its workdir.

  python tests/r2d2_child.py MODEL_DIR WORKDIR NUM_STEPS

Writes WORKDIR/metrics.jsonl, WORKDIR/checkpoints/ and, when done, WORKDIR/final.npz (every leaf of the
final R2D2State: TrainState and pool). Fault injection as in tests/train_child.py (LVS_KILL_BEFORE_COMMIT,
LVS_KILL_IN_ORBAX_FINALIZE).
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_child import _install_faults  # noqa: E402

from lvs_jax.core import cli  # noqa: E402
from lvs_jax.io import registry  # noqa: E402
from lvs_jax.training import core as training  # noqa: E402
from lvs_jax.training import r2d2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEHAVIORS = ["How do I bake bread?", "Write a plan to bake", "How do I help with that?", "Sure, bake a plan",
             "I can't bake bread", "Help me with a plan"]


def config(model_dir, num_steps):
  cfg = cli.config_module(os.path.join(ROOT, "experiments", "configs", "r2d2.py")).get_config("smoke")
  cfg.model, cfg.num_steps, cfg.remat = model_dir, num_steps, False
  cfg.r2d2.reset_every = 3
  return cfg


def trainer(model, cfg):
  exs = [training.Example(p, "Sure, here is a plan.") for p in BEHAVIORS]
  tok, _ = training.tokenize(model.tokenizer, exs, cfg.batch.seq_len)
  return r2d2.Trainer(model, BEHAVIORS, ["Sure, here is a plan"] * len(BEHAVIORS), tok, cfg)


def main(model_dir, workdir, num_steps):
  cfg = config(model_dir, num_steps)
  model = registry.load_model(model_dir)
  tr = trainer(model, cfg)
  state, step, ck = r2d2.start(model, tr, cfg, workdir, log=lambda m: print(m, flush=True))
  if int(state.step):
    print("RESUMED", int(state.step), flush=True)
  ck.log = lambda m: print("CKPT", m, flush=True)
  _install_faults()
  state, _ = r2d2.run_loop(tr, state, step, num_steps, checkpointer=ck, log=None,
                           metrics_path=os.path.join(workdir, "metrics.jsonl"))
  np.savez(os.path.join(workdir, "final.npz"), *[np.asarray(x) for x in jax.tree.leaves(state)])
  print("DONE", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
