"""Checkpoints: round trip, keep-all trajectories, corrupt/partial steps skipped loudly, kill-and-resume."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from helpers import finish, kill_after_step, tiny

from lvs_jax.io import checkpoints
from lvs_jax.training import core as training
from lvs_jax.training import lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "train_child.py")


@pytest.fixture(scope="module")
def lora_state():
  cfg, _ = tiny()
  opt = training.make_optimizer(optax.constant_schedule(1e-3))
  return training.init_state(lora.init(jax.random.key(0), cfg, 2, 4, modules=("q", "v")), opt, seed=3)


def _at_step(state, step):
  # A different state per step (params shifted by the step), so a wrong restore cannot pass.
  return training.TrainState(step=np.int32(step), params=jax.tree.map(lambda x: x + step, state.params),
                             opt_state=state.opt_state, rng=state.rng)


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_save_every_keep_all_restore_and_metadata(tmp_path, lora_state):
  ck = checkpoints.Checkpointer(tmp_path / "ck", save_every=2, metadata=dict(config={"lr": 1e-3}, data_hash="abc"))
  saved = [ck.save(_at_step(lora_state, s), force=(s == 5)) for s in range(6)]
  assert saved == [True, False, True, False, True, True]
  assert ck.steps() == [0, 2, 4, 5]
  state, meta = ck.restore_latest(checkpoints.abstract_like(lora_state))
  assert _equal(state, _at_step(lora_state, 5)) and isinstance(state.params, lora.LoraParams)
  assert meta["data_hash"] == "abc" and meta["step"] == 5 and meta["config"] == {"lr": 1e-3}
  assert checkpoints.read_metadata(tmp_path / "ck", 2)["step"] == 2
  assert _equal(ck.restore(2, checkpoints.abstract_like(lora_state))[0], _at_step(lora_state, 2))
  assert not ck.save(_at_step(lora_state, 4))  # already committed: no second save
  keep2 = checkpoints.Checkpointer(tmp_path / "k2", save_every=1, keep=2)
  for s in range(4):
    keep2.save(_at_step(lora_state, s))
  assert keep2.steps() == [2, 3]
  with pytest.raises(checkpoints.CheckpointMismatchError, match="data_hash"):
    ck.restore_latest(checkpoints.abstract_like(lora_state), expect=dict(data_hash="other"))


def test_corrupt_and_partial_checkpoints_are_skipped_with_a_message(tmp_path, lora_state):
  d = tmp_path / "ck"
  ck = checkpoints.Checkpointer(d, save_every=1)
  for s in range(4):
    ck.save(_at_step(lora_state, s))
  # step 3: a truncated array file; step 2: never committed; step 5: an orbax temporary directory.
  big = max((p for p in (d / "3" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  (d / "2" / checkpoints.COMMIT_FILE).unlink()
  shutil.copytree(d / "1", d / "5.orbax-checkpoint-tmp-1234")
  infos = {c.step: c for c in checkpoints.list_checkpoints(d)}
  assert [infos[s].status for s in (0, 1, 2, 3, 5)] == ["committed", "committed", "uncommitted", "corrupt", "partial"]
  assert "truncated" in infos[3].reason
  messages = []
  ck2 = checkpoints.Checkpointer(d, save_every=1, log=messages.append)
  state, meta = ck2.restore_latest(checkpoints.abstract_like(lora_state))
  assert int(state.step) == 1 and _equal(state, _at_step(lora_state, 1)) and meta["step"] == 1
  text = "\n".join(messages)
  for s, word in ((5, "partial"), (3, "corrupt"), (2, "uncommitted")):
    assert f"checkpoint step {s}" in text and word in text
  assert checkpoints.committed_steps(d) == [0, 1] and len(os.listdir(ck2.rejected_dir)) == 3
  ck2.save(_at_step(lora_state, 2))  # the rejected step can be written again
  assert checkpoints.committed_steps(d) == [0, 1, 2]
  with pytest.raises(ValueError, match="is missing|no such step"):
    ck2.restore(3, checkpoints.abstract_like(lora_state))


def test_trajectory_applies_a_metric_to_every_committed_checkpoint(tmp_path, lora_state):
  d = tmp_path / "ck"
  ck = checkpoints.Checkpointer(d, save_every=1)
  for s in (0, 3, 6):
    ck.save(_at_step(lora_state, s))
  (d / "6" / checkpoints.COMMIT_FILE).unlink()
  calls = []

  def metric(step, state):
    calls.append(step)
    return {"mean_b": float(np.mean(np.asarray(state.params.weights["q"].b)))}

  logs = []
  abstract = checkpoints.abstract_like(lora_state)
  rows = checkpoints.trajectory(d, abstract, metric, tmp_path / "traj.csv", log=logs.append)
  assert [r["step"] for r in rows] == [0, 3] and calls == [0, 3]
  np.testing.assert_allclose([r["mean_b"] for r in rows], [0.0, 3.0])
  assert any("step 6" in m and "uncommitted" in m for m in logs)
  assert (tmp_path / "traj.csv").read_text().splitlines()[0] == "step,mean_b"
  ck.save(_at_step(lora_state, 9))
  rows = checkpoints.trajectory(d, checkpoints.abstract_like(lora_state), metric, tmp_path / "traj.csv", log=None)
  assert [r["step"] for r in rows] == [0, 3, 9] and calls == [0, 3, 9]  # cached rows are not recomputed


def _child(workdir, steps, env_extra=None, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(env_extra or {})
  return subprocess.Popen([sys.executable, CHILD, str(workdir), str(steps)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT, **kw)



@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_reaches_bit_identical_state(tmp_path):
  n = 20
  rc, out = finish(_child(tmp_path / "ref", n))  # the uninterrupted run (also fills the compile cache)
  assert rc == 0, out
  wd = tmp_path / "run"
  # 1. killed inside orbax's save of step 4 (temporary directory written, not yet renamed)
  rc, out = finish(_child(wd, n, {"LVS_KILL_IN_ORBAX_FINALIZE": "4"}))
  assert rc == -signal.SIGKILL and "SELF-KILL" in out, out
  # 2. killed after orbax's rename of step 8, before our commit record
  rc, out = finish(_child(wd, n, {"LVS_KILL_BEFORE_COMMIT": "8"}))
  assert rc == -signal.SIGKILL and "RESUMED 2" in out and "checkpoint step 4" in out, out
  # 3. SIGKILL from outside at a random moment after a random step (often inside a save)
  seed = random.randrange(1 << 30)
  rnd = random.Random(seed)
  # metrics.jsonl still holds steps 1-8 of run 2 until the child rewrites it: wait for step >= 9.
  target, delay = rnd.randint(9, 15), rnd.uniform(0.0, 0.02)
  rc, out = kill_after_step(_child(wd, n), wd / "metrics.jsonl", target, delay)
  assert "RESUMED 6" in out and "checkpoint step 8" in out and "uncommitted" in out, (seed, out)
  assert rc in (-signal.SIGKILL, 0), (seed, out)  # 0: it finished before the signal landed
  # 4. resume to the end
  rc, out = finish(_child(wd, n))
  assert rc == 0, (seed, out)
  ref, got = np.load(tmp_path / "ref" / "final.npz"), np.load(wd / "final.npz")
  assert len(ref.files) == len(got.files) > 0
  for k in ref.files:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=f"leaf {k} differs (kill seed {seed}, target {target})")
  steps = [r["step"] for r in training.read_metrics(wd / "metrics.jsonl")]
  assert steps == list(range(1, n + 1)), (seed, steps)
  ref_loss = [r["loss"] for r in training.read_metrics(tmp_path / "ref" / "metrics.jsonl")]
  assert [r["loss"] for r in training.read_metrics(wd / "metrics.jsonl")] == ref_loss
  assert checkpoints.committed_steps(wd / "checkpoints") == list(range(0, n + 1, 2))
  assert json.loads((wd / "checkpoints" / str(n) / checkpoints.COMMIT_FILE).read_text())["step"] == n


@pytest.mark.parametrize("where", ["state", "metadata"])
def test_a_verified_checkpoint_that_fails_to_restore_stops_the_run_and_stays_in_place(tmp_path, lora_state,
                                                                                       monkeypatch, where):
  # Out of memory or an orbax version mismatch is not damage: moving the step aside would make the run
  # silently restart from an older step (or step 0). Only verification failures move a step.
  d = tmp_path / "ck"
  ck = checkpoints.Checkpointer(d, save_every=1)
  for s in range(2):
    ck.save(_at_step(lora_state, s))

  def boom(*a, **k):
    raise MemoryError("RESOURCE_EXHAUSTED: out of memory while restoring")

  if where == "state":
    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "restore", boom)
  else:
    monkeypatch.setattr(checkpoints, "read_metadata", boom)
  messages = []
  ck2 = checkpoints.Checkpointer(d, save_every=1, log=messages.append)
  with pytest.raises(checkpoints.CheckpointRestoreError, match="RESOURCE_EXHAUSTED") as e:
    ck2.restore_latest(checkpoints.abstract_like(lora_state))
  assert str(d / "1") in str(e.value) and isinstance(e.value.__cause__, MemoryError)
  assert checkpoints.committed_steps(d) == [0, 1] and not os.path.exists(ck2.rejected_dir) and not messages
