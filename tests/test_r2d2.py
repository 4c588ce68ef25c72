"""R2D2 adversarial training and its matched SFT baseline (lvs_jax/training/r2d2.py, experiments/train_r2d2.py)
on a tiny random chat model: HarmBench's away loss, the refusal target's EOS, the pool reset, adversarial
terms off == the SFT step, SIGKILL-resume bit identity of params and pool, the main's smoke run."""

import json
import os
import random
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import finish, kill_after_step
from test_training_experiments import jax_cache, tiny_chat_model  # noqa: F401 (fixtures)

from lvs_jax.io import checkpoints, registry
from lvs_jax.training import core as training
from lvs_jax.training import lora, r2d2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import r2d2_child  # noqa: E402


def test_away_loss_is_harmbench_log_1_minus_p_with_the_minus_5_threshold():
  logits = np.array([[[1.0, 2.0, 0.0, -1.0],    # target 1: p = 0.6439, counted
                      [5.2, 0.0, 0.0, 0.0],     # target 1: log p = -5.21 < -5, zeroed but counted
                      [0.0, 3.0, 1.0, 0.5],     # target 2: counted
                      [9.0, 9.0, 9.0, 9.0]]])   # padding (mask 0): ignored
  targets = np.array([[1, 1, 2, 3]])
  mask = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  pt = p[0, [0, 1, 2], [1, 1, 2]]
  assert np.log(pt[1]) < -5 < np.log(pt[0])
  want = -(np.log(1 - pt[0]) + np.log(1 - pt[2])) / 3  # HarmBench: -sum(log(1-p), kept) / (non-ignored count)
  s, n = r2d2.away_loss_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
  assert float(n) == 3 and want > 0
  np.testing.assert_allclose(float(s) / float(n), want, rtol=1e-6)
  s_all, _ = r2d2.away_loss_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask),
                                 threshold=-np.inf)
  np.testing.assert_allclose(float(s_all) / 3, want - np.log(1 - pt[1]) / 3, rtol=1e-6)
  assert float(s_all) > float(s)


def _trainer(model_dir, **over):
  cfg = r2d2_child.config(model_dir, 4)
  for k, v in over.items():
    if k.startswith("r2d2."):
      cfg.r2d2[k[5:]] = v
    else:
      cfg[k] = v
  return r2d2_child.trainer(registry.load_model(model_dir), cfg)


def test_toward_rows_end_with_eos_and_sft_baseline_has_no_suffix(tiny_chat_model):  # noqa: F811
  tr = _trainer(tiny_chat_model)
  pool = tr.init_pool()
  which = tr.select(0)
  sb = tr.step_batch(pool, which, 0)
  eot = training.end_of_turn_id(tr.tok)
  for i, e in enumerate(which):
    mask = np.asarray(sb.toward.loss_mask[i])
    last = int(np.nonzero(mask)[0][-1])
    assert int(sb.toward.targets[i, last]) == eot  # the last target token is EOS, inside the loss
    want = tr.tok.encode(r2d2.REFUSAL) + [eot]
    assert np.asarray(sb.toward.targets[i])[mask > 0].tolist() == want
    prompt = tr.tok.decode(np.asarray(sb.toward.tokens[i])[: int(np.nonzero(mask)[0][0]) + 1].tolist())
    assert " !" in prompt and tr.behaviors[int(pool.behavior[e])] in prompt
    away = np.asarray(sb.away.targets[i])[np.asarray(sb.away.loss_mask[i]) > 0].tolist()
    assert away == tr.tok.encode(tr.targets[int(pool.behavior[e])])  # the GCG target, no EOS
  sft = _trainer(tiny_chat_model, adversarial=False)
  spool = sft.init_pool()
  assert (spool.behavior == pool.behavior).all() and (spool.suffix_len == 0).all() and (pool.suffix_len > 0).all()
  sb2 = sft.step_batch(spool, which, 0)
  assert sb2.away is None
  i0 = int(np.nonzero(np.asarray(sb2.toward.loss_mask[0]))[0][0]) + 1
  plain = tr.tok.encode(tr.tok.format_chat(tr.behaviors[int(spool.behavior[which[0]])]))
  assert np.asarray(sb2.toward.tokens[0])[:i0].tolist() == plain  # the same refusal, on the plain behavior


def test_inner_gcg_moves_the_selected_suffixes_and_never_recompiles(tiny_chat_model):  # noqa: F811
  from lvs_jax.attacks import gcg

  tr = _trainer(tiny_chat_model, **{"r2d2.suffix_bangs": (3, 3), "r2d2.gcg_steps": 2})
  pool = tr.init_pool()
  params = tr.model.params
  which = tr.select(0)
  new = tr.attack(params, pool, which, 0)
  rest = np.setdiff1d(np.arange(len(pool.uid)), which)
  assert (new.suffix[rest] == pool.suffix[rest]).all() and not (new.suffix[which] == pool.suffix[which]).all()
  assert (new.suffix_len == pool.suffix_len).all()
  # The GCG loss of an updated suffix is below that of the initial one (the attack works on these params).
  for e in which:
    lay = tr.layout(int(pool.behavior[e]), int(pool.n_bang[e]))
    losses = []
    for suf in (pool.suffix[e], new.suffix[e]):
      b = gcg.make_batch([lay], tr.tok.pad_id)
      cache = gcg.prefix_cache(params, tr.model.cfg, b)
      losses.append(float(gcg.loss_and_grad(params, tr.model.cfg, b, cache,
                                            jnp.asarray(suf[None, :int(pool.suffix_len[e])]))[0][0]))
    assert losses[1] <= losses[0] + 1e-6, losses
  shifted = jax.tree.map(lambda x: x * 1.01, params)  # new weights, same shapes: no new trace
  traces = dict(gcg.TRACES)
  tr.attack(shifted, new, tr.select(1), 1)
  assert gcg.TRACES == traces


def test_pool_reset_replaces_exactly_20_percent_at_step_50(tiny_chat_model):  # noqa: F811
  tr = _trainer(tiny_chat_model, **{"r2d2.pool_size": 10, "r2d2.reset_every": 50})
  pool = tr.init_pool()
  assert sorted(pool.uid.tolist()) == list(range(10)) and int(pool.drawn) == 10
  for s in range(0, 101):
    new = tr.maybe_reset(pool, s)
    changed = np.nonzero(new.uid != pool.uid)[0]
    assert len(changed) == (2 if s in (50, 100) else 0), (s, changed)
    for e in changed:  # fresh behavior from the stream and a fresh "! " x U[lo, hi] suffix
      lay = tr.layout(int(new.behavior[e]), int(new.n_bang[e]))
      assert new.suffix[e, :new.suffix_len[e]].tolist() == lay.suffix_ids and new.uid[e] >= 10
    keep = np.setdiff1d(np.arange(10), changed)
    assert (new.suffix[keep] == pool.suffix[keep]).all() and (new.behavior[keep] == pool.behavior[keep]).all()
    pool = new
  assert int(pool.drawn) == 14 and len(set(pool.uid.tolist())) == 10


def test_adversarial_terms_off_is_the_sft_step_bit_for_bit():
  from helpers import tiny

  cfg, params = tiny()
  rng = np.random.default_rng(0)
  exs = [training.Tokenized(rng.integers(3, cfg.vocab_size, int(rng.integers(6, 20))).astype(np.int32), 3)
         for _ in range(12)]
  ds = training.Dataset(exs, batch_size=2, micro_batches=2, seq_len=32, pad_id=0, seed=1, packing=True)
  rows = training.Dataset(exs, batch_size=3, seq_len=32, pad_id=0, seed=2).batch(0)
  one = jax.tree.map(lambda x: x[0], rows)  # [K, T] toward / away rows
  sched = training.make_schedule(1e-2, 10, 2)
  opt = training.make_optimizer(sched, weight_decay=0.01)
  init = lambda: training.init_state(lora.init(jax.random.key(1), cfg, 4, 8), opt, seed=0)  # noqa: E731
  sft = training.make_train_step(cfg, opt, params, schedule=sched, remat=False)
  off = r2d2.make_step(cfg, opt, params, weights=dict(sft=1.0, toward=0.0, away=0.0), schedule=sched, remat=False)
  on = r2d2.make_step(cfg, opt, params, weights=dict(sft=1.0, toward=0.5, away=0.5), schedule=sched, remat=False)
  a, b, c = init(), init(), init()
  for s in range(3):
    a, ma = sft(a, ds.batch(s))
    b, mb = off(b, r2d2.StepBatch(ds.batch(s), one, one))
    c, mc = on(c, r2d2.StepBatch(ds.batch(s), one, one))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert float(ma["loss"]) == float(mb["loss"]) and "away" in mc and "away" not in mb
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a.params),
                                                                            jax.tree.leaves(c.params)))


def test_sft_baseline_run_without_the_refusal_term_is_core_sft_on_the_same_batches(tiny_chat_model):  # noqa: F811
  # The whole trainer (pool, selection, batches, schedule) adds nothing but its loss terms to the SFT step.
  from lvs_jax.training import recipes

  tr = _trainer(tiny_chat_model, adversarial=False, **{"r2d2.toward_weight": 0.0})
  init, opt, sched, _ = recipes.setup(tr.model, tr.cfg)
  state = r2d2.R2D2State(training.init_state(init(), opt, tr.cfg.seed), tr.init_pool())
  w = dict(sft=1.0, toward=0.0, away=0.0)
  step = r2d2.make_step(tr.model.cfg, opt, tr.model.params, weights=w, schedule=sched, remat=False)
  state, rows = r2d2.run_loop(tr, state, step, 3, log=None)
  ref = training.init_state(init(), opt, tr.cfg.seed)
  core_step = training.make_train_step(tr.model.cfg, opt, tr.model.params, schedule=sched, remat=False)
  ref, ref_rows = training.train_loop(ref, core_step, tr.dataset, 3, log=None, progress=False)
  for x, y in zip(jax.tree.leaves(state.train), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def _child(model_dir, wd, steps, cache, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(env_extra or {})
  child = os.path.join(ROOT, "tests", "r2d2_child.py")
  return subprocess.Popen([sys.executable, child, model_dir, str(wd), str(steps)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT)



@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_params_and_pool(tmp_path, tiny_chat_model, jax_cache):  # noqa: F811
  n = 8
  rc, out = finish(_child(tiny_chat_model, tmp_path / "ref", n, jax_cache))
  assert rc == 0, out[-3000:]
  wd = tmp_path / "run"
  rc, out = finish(_child(tiny_chat_model, wd, n, jax_cache, {"LVS_KILL_BEFORE_COMMIT": "4"}))
  assert rc == -signal.SIGKILL and "SELF-KILL" in out, out[-3000:]
  seed = random.randrange(1 << 30)
  rnd = random.Random(seed)
  target, delay = rnd.randint(5, 6), rnd.uniform(0.0, 0.05)
  rc, out = kill_after_step(_child(tiny_chat_model, wd, n, jax_cache), wd / "metrics.jsonl", target, delay)
  assert "RESUMED 2" in out and "checkpoint step 4" in out, (seed, out[-3000:])
  rc, out = finish(_child(tiny_chat_model, wd, n, jax_cache))
  assert rc == 0, (seed, out[-3000:])
  ref, got = np.load(tmp_path / "ref" / "final.npz"), np.load(wd / "final.npz")
  assert len(ref.files) == len(got.files) > 6
  for k in ref.files:  # TrainState leaves, then the pool's (uid, behavior, n_bang, suffix, suffix_len, drawn)
    np.testing.assert_array_equal(got[k], ref[k], err_msg=f"leaf {k} differs (kill seed {seed}, target {target})")
  assert [r["step"] for r in training.read_metrics(wd / "metrics.jsonl")] == list(range(1, n + 1))
  ref_rows = training.read_metrics(tmp_path / "ref" / "metrics.jsonl")
  got_rows = training.read_metrics(wd / "metrics.jsonl")
  assert [r["loss_ema"] for r in got_rows] == [r["loss_ema"] for r in ref_rows]
  suffix_changed = ref[ref.files[-3]]
  init = r2d2_child.trainer(registry.load_model(tiny_chat_model), r2d2_child.config(tiny_chat_model, n)).init_pool()
  assert not np.array_equal(suffix_changed, init.suffix)  # GCG moved the pool (the test sees the pool)


def _main(config, wd, model, cache, *over):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "train_r2d2.py"),
         f"--config={os.path.join(ROOT, 'experiments', 'configs', config)}", f"--workdir={wd}",
         f"--config.model={model}", *over]
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_train_r2d2_smoke_checkpoints_resume_and_load_model_at_step(tmp_path, tiny_chat_model, jax_cache):  # noqa: F811
  wd = tmp_path / "r2d2"
  r = _main("r2d2.py:smoke", wd, tiny_chat_model, jax_cache)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert checkpoints.committed_steps(wd / "checkpoints") == [0, 2, 4]
  rows = training.read_metrics(wd / "metrics.jsonl")
  assert [x["step"] for x in rows] == [1, 2, 3, 4] and all("away_ema" in x and x["gcg_seconds"] > 0 for x in rows)
  pool = json.loads((wd / "pool.json").read_text())
  assert len(pool) == 5 and all(p["suffix"] for p in pool)
  assert checkpoints.read_metadata(wd / "checkpoints", 4)["kind"] == "r2d2"
  r2 = _main("r2d2.py:smoke", wd, tiny_chat_model, jax_cache)
  assert r2.returncode == 0 and "resuming from step 4" in r2.stdout, r2.stderr[-3000:]
  base = registry.load_model(tiny_chat_model)
  m0, m4 = registry.load_model(f"{wd}@0"), registry.load_model(f"{wd}@4")
  assert m4.name == f"{wd}@4" and m4.tokenizer.format_chat("hi") == base.tokenizer.format_chat("hi")
  np.testing.assert_array_equal(m0.params.layers.wq, base.params.layers.wq)  # step 0: b = 0, the base model
  assert not np.array_equal(np.asarray(m4.params.layers.wq), np.asarray(base.params.layers.wq))
  with pytest.raises(ValueError, match=r"no committed step 3 \(committed: \[0, 2, 4\]\)"):
    registry.load_model(f"{wd}@3")
  # The matched SFT baseline: same start and data, no attack (no away term, no suffixes in the pool).
  ws = tmp_path / "sft"
  r3 = _main("r2d2.py:smoke_sft", ws, tiny_chat_model, jax_cache)
  assert r3.returncode == 0, r3.stdout[-2000:] + r3.stderr[-3000:]
  srows = training.read_metrics(ws / "metrics.jsonl")
  assert all("away" not in x and x["gcg_seconds"] == 0 for x in srows)
  assert [p["behavior"] for p in json.loads((ws / "pool.json").read_text())] == [p["behavior"] for p in pool]
  assert registry.load_model(f"{ws}@4").params.layers.wq.shape == base.params.layers.wq.shape
