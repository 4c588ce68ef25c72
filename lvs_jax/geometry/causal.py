"""Causal sweeps of carriers against matched random controls.

Two compiled kernels, each one jitted function for a whole grid (one trace per batch shape):

  add_sweep        h_l += c * v[l] on the residual stream entering layer l (site resid_pre), at every
                   prompt token, for each cell (layer l, coefficient c, vector v) of a grid. The
                   vectors are per-layer and **unnormalized**: coefficient units are the vector's own
                   norm, so c = 1 adds the raw diff-in-means carrier (refusal_direction's
                   activation addition) and c = -1 subtracts it. It *is* `lvs_jax.lvs.sweeps.sweep`
                   with absolute, unnormalized vectors (layers < l run once).
  ablation_sweep   for each direction d, projects d out of every layer and site (the
                   refusal-direction "directional ablation") and evaluates the same metrics.

Per cell and prompt both return refusal_score (logit refusal log-odds at the last prompt token,
nats; `judges.refusal_score`), kl (KL(clean || edited) of the next token, nats;
`sweeps.next_token_kl`), target_logprob and target_nll_per_token (of the batch's targets), plus the
clean metrics as clean_*. Refusal scores of a prompt list under one edit: `behavior.refusal_scores`.

Controls: random directions scaled to exactly the carrier's norm at each layer, independent across
layers and seeds, so a control cell adds a vector of the same size at the same layer with the same
coefficient, and only the direction differs. Two kinds:
  isotropic     (`matched_controls`) Gaussian directions, uniform on the sphere;
  anisotropic   (`anisotropic_controls`) directions drawn from the activation covariance at that
                layer, x = L z with z ~ N(0, I) and Sigma = L L^T, i.e. random directions in the data's
                own geometry (a carrier beats these only if it is special among the directions the
                activations actually use, not merely "in the high-variance subspace").
`carriers.matched_vectors` puts carriers of different norms on one scale (unit direction x a norm
relative to the activation norm at the layer) for the norm- and layer-matched comparison.

Effect sizes (`effect_vs_controls`, `paired_difference`): differences of means over the same
prompts, with paired bootstrap intervals (prompts resampled with replacement, the same resample
for every condition).
`z_score`: the carrier's effect in standard deviations of the control seeds' effects.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import batching
from lvs_jax.core import edit as edit_lib
from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig
from lvs_jax.core.tokenizer import LoadedModel
from lvs_jax.evals import stats
from lvs_jax.lvs import sweeps


def matched_controls(key: jax.Array, vectors: jax.Array | np.ndarray, n: int) -> np.ndarray:
  """n random vectors per layer with exactly the norm of `vectors` [L, D] at that layer -> [n, L, D] float32.

  Directions are isotropic Gaussian, normalized (in float64, so norms match to float32 rounding).
  """
  v = np.asarray(vectors, np.float64)
  r = np.asarray(jax.random.normal(key, (n, *v.shape), jnp.float32), np.float64)
  r /= np.linalg.norm(r, axis=-1, keepdims=True)
  return (r * np.linalg.norm(v, axis=-1)[None, :, None]).astype(np.float32)


def anisotropic_controls(key: jax.Array, x: np.ndarray, vectors: jax.Array | np.ndarray, n: int, *,
                         groups: np.ndarray | None = None) -> np.ndarray:
  """n random directions per layer drawn from the activation covariance, at the norm of `vectors` -> [n, L, D].

  x [L, N, D]: activations at the carrier's layer and token. Per layer l, with Xc the centered
  activations [N, D] and L_l = Xc^T / sqrt(N - 1) (so Sigma_l = L_l L_l^T is the sample covariance,
  rank <= N - 1, no factorization needed), a control is L_l z with z ~ N(0, I_N), normalized (float64)
  and scaled to ||vectors[l]||. groups [N] (optional, e.g. a carrier's +1/-1/0 labels): center each
  group on its own mean, so Sigma is the within-group covariance and the carrier's own between-group
  direction does not dominate the draws. Deterministic in `key`; float32 out.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 3:
    raise ValueError(f"anisotropic_controls: activations must be [L, N, D], got shape {x.shape}")
  v = np.asarray(vectors, np.float64)
  if v.shape != (x.shape[0], x.shape[2]):
    raise ValueError(f"anisotropic_controls: vectors {v.shape} do not match activations [L, D] = "
                     f"{(x.shape[0], x.shape[2])}")
  g = np.zeros(x.shape[1], np.int64) if groups is None else np.asarray(groups)
  if g.shape != (x.shape[1],):
    raise ValueError(f"anisotropic_controls: groups {g.shape} do not match N = {x.shape[1]}")
  xc = x.copy()
  for val in np.unique(g):
    xc[:, g == val] -= x[:, g == val].mean(1, keepdims=True)
  z = np.asarray(jax.random.normal(key, (n, x.shape[0], x.shape[1]), jnp.float32), np.float64)
  r = np.einsum("kln,lnd->kld", z, xc) / np.sqrt(max(x.shape[1] - 1, 1))
  with np.errstate(invalid="ignore", divide="ignore"):  # a constant layer (e.g. layer 0 at a template token)
    r /= np.linalg.norm(r, axis=-1, keepdims=True)
  r = np.nan_to_num(r, nan=0.0)
  return (r * np.linalg.norm(v, axis=-1)[None, :, None]).astype(np.float32)


def add_sweep(params, cfg: ModelConfig, batch: sweeps.SweepBatch, layers: jax.Array, coefficients: jax.Array,
              vectors: jax.Array, refusal_ids: jax.Array, *, chunk: int = 8) -> dict:
  """Adds coefficient * vectors[v, l] at resid_pre of layer l (every prompt token), per grid cell.

  layers [nL] int, coefficients [nC], vectors [nV, L, D] (absolute units, not normalized).
  Returns {refusal_score, refusal_delta, kl, target_logprob, target_nll_per_token} each
  [nL, nC, nV, B], and clean_* [B]. The kernel is `lvs_jax.lvs.sweeps.sweep` with absolute,
  unnormalized vectors (one compiled function for the grid).
  """
  return sweeps.sweep(params, cfg, batch, layers, coefficients, vectors, refusal_ids, relative=False,
                      normalize=False, chunk=chunk)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "sites"))
def ablation_sweep(
  params,
  cfg: ModelConfig,
  batch: sweeps.SweepBatch,
  directions: jax.Array,
  refusal_ids: jax.Array,
  *,
  chunk: int = 4,
  sites: tuple[str, ...] = edit_lib.SITES,
) -> dict:
  """Projects each direction [nD, D] (any norm) out of every layer at `sites`, at every position.

  Returns {refusal_score, refusal_delta, kl, target_logprob, target_nll_per_token} each [nD, B],
  and clean_* [B].
  """
  pos = sweeps.readout_positions(batch)
  out = model_lib.forward(params, batch.tokens, cfg, attention_mask=batch.mask, logits_positions=pos)
  clean = sweeps.metrics_from_logits(out.logits, batch, refusal_ids)

  def cell(d):
    e = edit_lib.ablate_directions(cfg.n_layers, d, sites=sites)
    return sweeps.edited_metrics(params, cfg, batch, refusal_ids, clean, edit=e)

  return sweeps.with_clean(jax.lax.map(cell, jnp.asarray(directions, jnp.float32), batch_size=chunk), clean)


def _batched(model: LoadedModel, prompts: Sequence[str], batch_size: int, fn, targets=None) -> dict:
  """Runs fn(batch) over fixed-size batches (`batching.pad_batches`) and concatenates the per-prompt
  axis (the last one) of every output, dropping the padding."""
  prompts = list(prompts)
  parts = []
  for rows, n in batching.pad_batches(range(len(prompts)), batch_size):
    tg = None if targets is None else [targets[i] for i in rows]
    res = fn(sweeps.make_batch(model.tokenizer, [prompts[i] for i in rows], tg))
    parts.append({k: np.asarray(v)[..., :n] for k, v in res.items()})
  return {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}


def add_sweep_prompts(model: LoadedModel, prompts: Sequence[str], layers, coefficients, vectors, refusal_ids, *,
                      targets=None, batch_size: int = 16, chunk: int = 8) -> dict:
  """`add_sweep` over a prompt list -> numpy {name: [nL, nC, nV, N]} (clean_*: [N])."""
  layers, coefficients = jnp.asarray(layers, jnp.int32), jnp.asarray(coefficients, jnp.float32)
  vectors, ids = jnp.asarray(vectors, jnp.float32), jnp.asarray(refusal_ids)
  return _batched(model, prompts, batch_size, targets=targets, fn=lambda b: add_sweep(
    model.params, model.cfg, b, layers, coefficients, vectors, ids, chunk=chunk))


def ablation_sweep_prompts(model: LoadedModel, prompts: Sequence[str], directions, refusal_ids, *, targets=None,
                           batch_size: int = 16, chunk: int = 4) -> dict:
  """`ablation_sweep` over a prompt list -> numpy {name: [nD, N]} (clean_*: [N])."""
  dirs, ids = jnp.asarray(directions, jnp.float32), jnp.asarray(refusal_ids)
  return _batched(model, prompts, batch_size, targets=targets, fn=lambda b: ablation_sweep(
    model.params, model.cfg, b, dirs, ids, chunk=chunk))


# ----------------------------------------------------------------------------- effect sizes


def z_score(treated: float, control_means: np.ndarray) -> float:
  """(treated - mean(controls)) / std(controls) with ddof=1: the carrier in units of the control seeds'
  spread. nan with fewer than 2 controls or when every control gives the same value (std 0)."""
  c = np.asarray(control_means, np.float64).ravel()
  if c.size < 2:
    return float("nan")
  sd = c.std(ddof=1)
  return float((treated - c.mean()) / sd) if sd > 0 else float("nan")



def paired_difference(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
  """mean(a) - mean(b) over the same N prompts, with a paired bootstrap interval.

  a, b: [N] or [K, N] (the mean over K, e.g. control seeds, is taken first for each resample).
  Returns {diff, low, high, p_le_0 (share of resamples with diff <= 0)}.
  """
  a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
  if a.shape[-1] != b.shape[-1]:
    raise ValueError(f"paired_difference: {a.shape[-1]} vs {b.shape[-1]} prompts")
  d = a.mean(0) - b.mean(0)  # [N] per-prompt difference (K-averaged)
  boots = d[stats.bootstrap_indices(seed, d.shape[0], n_boot)].mean(-1)
  low, high = stats.percentile_interval(boots, level)
  return dict(diff=float(d.mean()), low=float(low), high=float(high),
              p_le_0=float((boots <= 0).mean()))


def effect_vs_controls(treated: np.ndarray, controls: np.ndarray, baseline: np.ndarray | None = None, *,
                       n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
  """Effect of a carrier intervention against K matched random controls, on the same N prompts.

  treated [N], controls [K, N], baseline [N] (unedited) or None; values per prompt (e.g. 1 if the
  harmful prompt was answered, or a refusal score). Returns
    treated, control_mean, control_max (over seeds), baseline       means
    effect, effect_low, effect_high     mean(treated) - mean over seeds of mean(control), paired CI
    delta, delta_low, delta_high        mean(treated) - mean(baseline) (when given)
    control_delta (+ low/high)          mean(controls) - mean(baseline)
    exceeds_all_controls                mean(treated) > every control seed's mean
    control_std, z                      std over seeds of the control means (ddof=1) and `z_score`
  """
  t = np.asarray(treated, np.float64)
  c = np.atleast_2d(np.asarray(controls, np.float64))
  e = paired_difference(t, c, n_boot=n_boot, seed=seed, level=level)
  cm = c.mean(-1)
  out = dict(treated=float(t.mean()), control_mean=float(cm.mean()), control_max=float(cm.max()),
             control_min=float(cm.min()), effect=e["diff"], effect_low=e["low"], effect_high=e["high"],
             exceeds_all_controls=bool(t.mean() > cm.max()), n_prompts=int(t.shape[-1]), n_controls=int(c.shape[0]),
             control_std=float(cm.std(ddof=1)) if cm.size > 1 else float("nan"), z=z_score(float(t.mean()), cm))
  if baseline is not None:
    b = np.asarray(baseline, np.float64)
    d = paired_difference(t, b, n_boot=n_boot, seed=seed, level=level)
    dc = paired_difference(c, b, n_boot=n_boot, seed=seed, level=level)
    out.update(baseline=float(b.mean()), delta=d["diff"], delta_low=d["low"], delta_high=d["high"],
               control_delta=dc["diff"], control_delta_low=dc["low"], control_delta_high=dc["high"])
  return out
