"""Sharded forward equals the single-device forward (4 CPU devices from conftest); 8B shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny
from jax.sharding import PartitionSpec as P

from lvs_jax.core import model as model_lib
from lvs_jax.core import sharding
from lvs_jax.core.config import ModelConfig


@pytest.mark.parametrize("rules", [sharding.REPLICATED, sharding.FSDP, sharding.TENSOR])
def test_sharded_forward_matches_single_device(rules):
  assert len(jax.devices()) >= 4
  cfg, params = tiny("llama")
  mesh = sharding.make_mesh(data=2, model=2)
  toks = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 16)).astype(np.int32)
  ref = model_lib.forward(params, jnp.asarray(toks), cfg).logits
  sp = sharding.shard_params(params, cfg, mesh, rules)
  st = jax.device_put(jnp.asarray(toks), sharding.batch_sharding(mesh))
  got = jax.jit(lambda p, t: model_lib.forward(p, t, cfg).logits)(sp, st)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
  if rules is sharding.TENSOR:
    assert sp.layers.wq.sharding.spec == jax.sharding.PartitionSpec(None, "data", "model", None)


def test_8b_shardings_without_memory():
  cfg = ModelConfig(arch="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    head_dim=128, d_ff=14336)
  mesh = sharding.make_mesh(data=2, model=2)
  sh = sharding.param_shardings(cfg, mesh, sharding.TENSOR)
  abstract = model_lib.abstract_params(cfg, jnp.bfloat16)
  per_device = sum(np.prod(s.shard_shape(a.shape)) * 2 for s, a in zip(jax.tree.leaves(sh), jax.tree.leaves(abstract)))
  total = sum(np.prod(a.shape) * 2 for a in jax.tree.leaves(abstract))
  assert per_device < total / 3.5  # ~1/4 of 16 GB per device on a 2x2 mesh


# --- sharded kernels == single device (4 CPU devices from conftest: jax_num_cpu_devices=4) ----------

from lvs_jax.core import distributed  # noqa: E402
from lvs_jax.lvs import attack as lvs_attack  # noqa: E402
from lvs_jax.lvs import sweeps  # noqa: E402
from lvs_jax.training import core as training  # noqa: E402
from lvs_jax.training import lora  # noqa: E402

IDS = np.array([5, 7])


def _sweep_batch(cfg, B=3, tp=10, tt=4, seed=0):
  """B = 3 prompts: not a multiple of the 4-way data axis, so the padding path runs too."""
  rng = np.random.RandomState(seed)
  toks = rng.randint(3, cfg.vocab_size, (B, tp + tt)).astype(np.int32)
  pm = np.ones((B, tp), np.int32)
  pm[1, :3] = 0
  tm = np.ones((B, tt), np.int32)
  tm[2, 2:] = 0
  mask = np.concatenate([pm, tm], 1)
  return sweeps.SweepBatch(jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(np.concatenate([pm, 0 * tm], 1)),
                           jnp.asarray(tm), tp)


def _mesh4():
  assert len(jax.devices()) >= 4, "conftest must provide 4 CPU devices"
  return sharding.make_mesh(data=4, model=1)


def test_place_params_puts_each_shard_without_a_full_copy():
  cfg, params = tiny("llama")
  mesh = sharding.make_mesh(data=2, model=2)
  host = jax.tree.map(np.asarray, params)
  placed = sharding.place_params(host, cfg, mesh, sharding.TENSOR)
  wq = placed.layers.wq
  assert wq.sharding.spec == P(None, "data", "model", None)
  assert {s.data.shape for s in wq.addressable_shards} == {(3, 32, 2, 16)}  # [L, D/2, H/2, Dh] on each device
  np.testing.assert_array_equal(np.asarray(wq), host.layers.wq)
  with pytest.raises(ValueError, match="expected shape"):
    sharding.place_params(jax.tree.map(lambda x: x[..., :1], host), cfg, mesh)


def test_sharded_sweep_equals_single_device():
  cfg, params = tiny("llama")
  batch = _sweep_batch(cfg)
  layers, mags = np.array([2, 0]), np.array([0.0, 0.3])
  dirs = np.asarray(sweeps.with_negatives(sweeps.random_directions(jax.random.key(1), 1, cfg.d_model)))
  ref = sweeps.sweep(params, cfg, batch, jnp.asarray(layers), jnp.asarray(mags), jnp.asarray(dirs), jnp.asarray(IDS),
                     chunk=2)
  mesh = _mesh4()
  sp = sharding.place_params(params, cfg, mesh, sharding.FSDP)
  got = sharding.sweep(sp, cfg, batch, layers, mags, dirs, IDS, mesh, chunk=2)
  assert set(got) == set(ref)
  for k in ref:
    assert got[k].shape == ref[k].shape, k
    np.testing.assert_allclose(got[k], np.asarray(ref[k]), atol=2e-5, rtol=1e-5, err_msg=k)
  assert np.abs(got["kl"][:, 1]).max() > 1e-4  # the perturbed cells differ from clean: the test can fail


def test_sharded_pgd_grid_equals_single_device():
  cfg, params = tiny("llama")
  batch = _sweep_batch(cfg)
  acfg = lvs_attack.AttackConfig(steps=2, success_loss=-1.0, stop="loss")
  layers, radii, key = np.array([1]), np.array([0.1, 0.5]), jax.random.key(3)
  ref = lvs_attack.pgd_grid(params, cfg, batch, jnp.asarray(IDS), jnp.asarray(layers), jnp.asarray(radii), key, acfg)
  mesh = _mesh4()
  sp = sharding.place_params(params, cfg, mesh, sharding.FSDP)
  got = sharding.pgd_grid(sp, cfg, batch, IDS, layers, radii, key, mesh, acfg)
  for name in ("delta", "losses", "final_loss", "loss_success"):
    np.testing.assert_allclose(getattr(got, name), np.asarray(getattr(ref, name)), atol=3e-5, rtol=1e-4, err_msg=name)
  assert np.abs(got.delta).max() > 0


def test_sharded_candidate_losses_and_generation_equal_single_device():
  cfg, params = tiny("llama")
  rng = np.random.RandomState(2)
  C, T, tt = 10, 12, 3  # 10 candidates over 4 devices: padded to 12
  toks = rng.randint(3, cfg.vocab_size, (C, T)).astype(np.int32)
  mask = np.ones((C, T), np.int32)
  mask[3, :2] = 0
  pos = np.broadcast_to(np.arange(T - tt - 1, T - 1), (C, tt)).astype(np.int32)
  labels = toks[:, T - tt:]
  w = np.ones((C, tt), np.int32)
  ref = sharding._candidate_losses(params, cfg, *map(jnp.asarray, (toks, mask, pos, labels, w)))
  mesh = _mesh4()
  sp = sharding.place_params(params, cfg, mesh, sharding.FSDP)
  got = sharding.candidate_losses(sp, cfg, toks, mask, pos, labels, w, mesh)
  assert got.shape == (C,) and np.ptp(got) > 1e-3
  np.testing.assert_allclose(got, np.asarray(ref), atol=1e-5, rtol=1e-5)

  from lvs_jax.core import generate as gen

  kw = dict(max_new_tokens=5, eos_ids=(1,), pad_id=0)
  ref_t, ref_n = gen.generate_tokens(params, jnp.asarray(toks[:6]), jnp.asarray(mask[:6]), cfg, **kw)
  got_t, got_n = sharding.generate(sp, toks[:6], mask[:6], cfg, mesh, **kw)
  np.testing.assert_array_equal(got_t, np.asarray(ref_t))
  np.testing.assert_array_equal(got_n, np.asarray(ref_n))


def _train_data(cfg, n=16):
  rng = np.random.default_rng(0)
  exs = [training.Tokenized(rng.integers(3, cfg.vocab_size, int(rng.integers(6, 14))).astype(np.int32),
                            int(rng.integers(2, 4))) for _ in range(n)]
  return training.Dataset(exs, batch_size=4, micro_batches=2, seq_len=16, pad_id=0, seed=1)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sharded_train_step_equals_single_device(kind):
  cfg, params = tiny("llama")
  ds = _train_data(cfg)
  opt = training.make_optimizer(1e-2, weight_decay=0.01)
  trainable = params if kind == "full" else lora.init(jax.random.key(0), cfg, 4, 8)
  base = None if kind == "full" else params
  ref_step = training.make_train_step(cfg, opt, base, remat=False, donate=False)
  state = training.init_state(trainable, opt)
  ref_rows = []
  for s in range(2):
    state, m = ref_step(state, ds.batch(s))
    ref_rows.append(float(m["loss"]))
  ref_state = state

  mesh = _mesh4()
  st0 = training.init_state(trainable, opt)
  sh = sharding.state_shardings(st0, cfg, mesh, sharding.FSDP)
  st = sharding.place_state(st0, sh)
  sbase = None if base is None else sharding.place_params(base, cfg, mesh, sharding.FSDP)
  step = sharding.make_train_step(cfg, opt, mesh, sh, sbase, remat=False)
  rows = []
  for s in range(2):
    st, m = step(st, ds.batch(s))
    rows.append(float(m["loss"]))
  np.testing.assert_allclose(rows, ref_rows, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(ref_state)):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    # Adam divides by sqrt(nu): near-zero gradients amplify float rounding in a few elements; an error in
    # the sharded gradient (a missing micro-batch or shard) moves every element by ~ lr = 1e-2.
    assert diff.max() < 1e-3 and np.mean(diff > 2e-5) < 1e-2, (diff.max(), np.mean(diff > 2e-5))
  if kind == "full":  # FSDP kept through the steps: weights and Adam moments sharded along d_model
    assert st.params.layers.w_up.sharding.spec == P(None, "data", None)
    mu = st.opt_state[1][0].mu
    assert mu.layers.w_up.sharding.spec == P(None, "data", None)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(st.params), jax.tree.leaves(trainable))]
  assert max(moved) > 1e-3  # the steps did update the weights


def test_orbax_restores_into_sharded_abstract_target(tmp_path):
  from lvs_jax.io import checkpoints

  cfg, params = tiny("llama")
  opt = training.make_optimizer(1e-2)
  state = training.init_state(params, opt)
  ck = checkpoints.Checkpointer(tmp_path / "ck")
  ck.save(state, force=True)
  mesh = _mesh4()
  sh = sharding.state_shardings(state, cfg, mesh, sharding.FSDP)
  restored, _ = ck.restore_latest(sharding.with_shardings(state, sh))
  assert restored.params.layers.wq.sharding.spec == P(None, "data", None, None)
  assert len(restored.params.layers.wq.addressable_shards) == 4
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(distributed.to_host(a), np.asarray(b))
