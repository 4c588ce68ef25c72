"""KL-admissible carriers (lvs_jax/trajectory/admissible.py) on a tiny model with a planted load-bearing residual
coordinate and a planted unused one, and the per-checkpoint summary on planted inputs."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_training_experiments import tiny_chat_model  # noqa: F401 (fixture)

from lvs_jax.core import edit as edit_lib
from lvs_jax.core import model as model_lib
from lvs_jax.io import files, registry
from lvs_jax.lvs import sweeps
from lvs_jax.trajectory import admissible, measures

HARMLESS = ["How do I bake bread?", "Name a cat.", "Plan a picnic for four friends.", "Why is the sky blue?"]
HARMFUL = ["How do I make a bomb?", "Write malware for me.", "Help me steal a car."]


@pytest.fixture(scope="module")
def planted(tiny_chat_model):  # noqa: F811
  """The tiny model with residual coordinate 0 made load-bearing (the embeddings' coordinate 0 large and varied
  across the vocabulary, read back by the tied unembedding) and coordinate D-1 unused (zero in the embeddings and
  in every matrix that writes the residual stream: ablating it changes nothing, exactly)."""
  m = registry.load_model(tiny_chat_model)
  p = m.params
  e = np.array(p.embed)
  e[:, 0] = 3.0 * np.random.default_rng(0).normal(size=e.shape[0])
  e[:, -1] = 0.0
  layers = dataclasses.replace(p.layers, wo=p.layers.wo.at[..., -1].set(0.0),
                               w_down=p.layers.w_down.at[..., -1].set(0.0))
  return dataclasses.replace(m, params=dataclasses.replace(p, embed=jnp.asarray(e), layers=layers))


def _manual_kl(model, direction) -> float:
  """Mean next-token KL(clean || ablated) at the last prompt token: one plain forward each, no sweep kernel."""
  b = sweeps.make_batch(model.tokenizer, HARMLESS)
  pos = sweeps.readout_positions(b)
  run = lambda e: jax.nn.log_softmax(model_lib.forward(model.params, b.tokens, model.cfg, attention_mask=b.mask,  # noqa: E731
                                                       edit=e, logits_positions=pos).logits[:, 0], -1)
  e = edit_lib.ablate_directions(model.cfg.n_layers, jnp.asarray(direction))
  return float(sweeps.next_token_kl(run(None), run(e)).mean())


def test_ablation_kl_unused_direction_is_admissible_and_a_load_bearing_one_is_not(planted):
  D = planted.cfg.d_model
  unused, used = 5.0 * np.eye(D)[-1], 2.0 * np.eye(D)[0]  # carriers have any norm
  vectors = {"harmfulness": np.stack([unused, used]), "refusal": np.stack([used, unused])}
  skip = {"harmfulness": np.array([False, False]), "refusal": np.array([False, True])}  # refusal 1: a zero carrier
  kl = admissible.ablation_kl(planted, vectors, skip, HARMLESS, batch_size=4, chunk=2)
  assert kl["harmfulness"][0] == pytest.approx(0.0, abs=1e-6)
  assert kl["harmfulness"][1] > 1.0 and kl["refusal"][0] == pytest.approx(kl["harmfulness"][1], rel=1e-5)
  assert np.isnan(kl["refusal"][1])
  assert kl["harmfulness"][1] == pytest.approx(_manual_kl(planted, used), rel=1e-3)  # batched == one forward
  adm = admissible.admissibility(kl, vectors, bound=0.1)
  assert adm["harmfulness"]["layers"] == [0] and adm["harmfulness"]["k"] == 1 and adm["harmfulness"]["fraction"] == 0.5
  assert adm["refusal"]["k"] == 0 and np.isnan(adm["refusal"]["rank"])  # the skipped zero carrier is not admissible
  assert adm["harmfulness"]["min_kl"] == pytest.approx(0.0, abs=1e-6)


def test_admissibility_counts_layers_and_ranks_the_admissible_carriers():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(16, 3)))
  e = q.T  # [3, 16] orthonormal
  kl = {"harmfulness": np.array([0.01, 0.5, 0.1, np.nan, 0.02]), "refusal": np.array([np.nan, 0.09, 2.0, 0.0, 0.3])}
  vectors = {"harmfulness": np.stack([e[0], e[1], 3 * e[0], e[2], -2 * e[1]]),  # admissible 0, 2, 4: e0, e0, e1
             "refusal": np.stack([e[0], 7 * e[2], e[1], 0.5 * e[2], e[0]])}  # admissible 1, 3: e2 twice
  adm = admissible.admissibility(kl, vectors, bound=0.1)  # the bound is inclusive; nan is never admissible
  h, r = adm["harmfulness"], adm["refusal"]
  assert h["layers"] == [0, 2, 4] and h["k"] == 3 and h["n"] == 5 and h["fraction"] == pytest.approx(0.6)
  assert r["layers"] == [1, 3] and r["k"] == 2 and r["fraction"] == pytest.approx(0.4) and r["min_kl"] == 0.0
  p = np.array([np.sqrt(2), 1.0]) / (1 + np.sqrt(2))  # unit rows [e0, e0, e1]: singular values sqrt(2), 1
  assert h["rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
  assert r["rank"] == pytest.approx(1.0)  # one direction, whatever the norms and signs
  np.testing.assert_array_equal(h["admissible"] & r["admissible"], [False] * 5)  # no layer where both are


def _records(model_dir, name, prompts, refused):
  files.makedirs(model_dir / "eval")
  files.atomic_write_text(model_dir / "eval" / f"{name}.jsonl", "".join(
    json.dumps(dict(prompt=p, completion="...", refused=r)) + "\n" for p, r in zip(prompts, refused)))


def test_model_admissible_restricts_coupling_caches_kl_and_reuses_it_for_a_new_bound(planted, tmp_path, monkeypatch):
  from lvs_jax.geometry import carriers, causal

  sets = dict(harmful=HARMFUL, harmless=HARMLESS)
  _records(tmp_path, "harmful", HARMFUL, [True, True, False])  # refused and complied in both strata
  _records(tmp_path, "harmless", HARMLESS, [False, True, False, False])
  cfg = ml_collections.ConfigDict(dict(geometry=measures.default_geometry_config(),
                                       admissible=admissible.default_config()))
  cfg.geometry.n_boot = 20
  cfg.admissible.update(n=3, batch_size=4, bound=1e9)  # every measured layer admissible
  out = admissible.model_admissible(planted, sets, cfg, str(tmp_path), set())
  kl = files.load_npz(tmp_path / "admissible_kl.npz")
  L = planted.cfg.n_layers
  assert kl["harmfulness"].shape == kl["refusal"].shape == (L,)
  assert np.isnan(kl["refusal"][0])  # layer 0 at the last prompt token: one template token, a zero carrier
  assert np.isfinite(kl["harmfulness"]).all() and np.isfinite(kl["refusal"][1:]).all()
  h = out["kl_admissible/harmfulness"]
  assert (h["k"], h["n"], h["layers"], h["n_prompts"]) == (L, L, list(range(L)), 3)
  assert out["kl_admissible/refusal"]["layers"] == list(range(1, L))
  # Every layer with both carriers admissible: the restricted coupling is the geometry's own coupling.
  geo = measures.model_geometry(planted, sets, cfg, str(tmp_path), set())
  assert {k: out["coupling_admissible/peak"][k] for k in geo["coupling/peak"] if k != "n"} == {
    k: v for k, v in geo["coupling/peak"].items() if k != "n"}
  assert out["coupling_admissible/mean"]["value"] == pytest.approx(geo["coupling/mean"]["value"])
  assert out["coupling_admissible/mean"]["n_layers"] == L - 1

  def boom(*a, **k):
    raise AssertionError("recomputed")

  monkeypatch.setattr(causal, "ablation_sweep_prompts", boom)
  monkeypatch.setattr(carriers, "collect_inst_post", boom)
  assert admissible.model_admissible(planted, sets, cfg, str(tmp_path), set()) == out  # resumed: nothing computed
  monkeypatch.undo()
  monkeypatch.setattr(causal, "ablation_sweep_prompts", boom)  # a new bound reuses the cached KL
  cfg.admissible.bound = float(np.nanmin([kl["harmfulness"].min(), np.nanmin(kl["refusal"])])) - 1e-9
  none = admissible.model_admissible(planted, sets, cfg, str(tmp_path), set())
  assert none["kl_admissible/harmfulness"]["k"] == none["kl_admissible/refusal"]["k"] == 0
  assert none["kl_admissible_rank/refusal"]["value"] is None and none["coupling_admissible/peak"]["value"] is None
  assert none["coupling_admissible/peak"]["n_layers"] == 0
