"""Harmfulness and refusal carriers: per-layer difference-in-means directions of the residual stream.

A *carrier* of a concept at layer l is the difference between the mean residual stream of prompts
that have it and of prompts that do not, read at one token position (the safety-geometry paper's
terminology; Arditi et al. 2024 call the refusal one the "refusal direction"):

  harmfulness   mean(harmful) - mean(harmless) at t_inst, the last token of the user's instruction,
                before the chat template's post-instruction tokens (Zhao et al. 2025: harmfulness
                is encoded where the instruction ends, refusal where the answer starts)
  refusal       mean(refused) - mean(complied) at t_post_inst, the last prompt token, with the
                labels from the model's own greedy generations judged by `lvs_jax.evals.judges`
  refusal_hh    mean(harmful) - mean(harmless) at t_post_inst (Arditi et al.'s refusal direction,
                kept for comparison: it mixes harmfulness and refusal)
  refusal_within_harmful, refusal_within_harmless
                mean(refused) - mean(complied) at t_post_inst *within* one stratum of the pool (harmful
                prompts; harmless and XSTest-safe prompts): over the whole pool "refused" is almost
                "harmful", so the behavioral refusal carrier can be the harmfulness direction in
                disguise; within a stratum harmfulness is held fixed (`stratified_refusal_labels`)

Shapes: activations [L, N, D] (as `lvs_jax.evals.activations.collect` returns them), carriers [L, D].
Site: `resid_pre` by default, the residual stream *entering* block l, so carrier l is exactly what
the sweep kernels (`lvs_jax.lvs.sweeps`, `lvs_jax.geometry.causal`) add at layer l. Means are accumulated in
float64 (chunked sums: `MeanAccumulator`), stored as float32.

Selection (`select_layer`, optional) follows refusal_direction's `select_direction`
(github.com/andyrdt/refusal_direction, pipeline/submodules/select_direction.py): among the
per-layer candidates, discard those whose directional ablation (every layer and site) moves the
next-token distribution on harmless prompts by KL > 0.1 nats, whose addition (coefficient 1, raw
carrier, at its own layer) fails to induce refusal on harmless prompts (mean refusal score < 0), or
that lie in the last 20% of layers; pick the one whose ablation gives the lowest mean refusal score
on harmful validation prompts. When every candidate is filtered (SmolLM2-135M-Instruct: every
harmfulness candidate's ablation has KL > 0.8 nats, and nothing lifts its refusal log-odds above 0),
`fallback_layer` relaxes the filters in a fixed, recorded order.

Persistence: `save_carriers` / `load_carriers` write `<path>.npz` (arrays only; loaded with
allow_pickle=False) and `<path>.json` (everything else). Never pickle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import batching
from lvs_jax.core import edit as edit_lib
from lvs_jax.core import model as model_lib
from lvs_jax.core.tokenizer import LoadedModel
from lvs_jax.evals import activations, judges
from lvs_jax.geometry import causal
from lvs_jax.io import files

HARMFULNESS = "harmfulness"
REFUSAL = "refusal"
REFUSAL_HH = "refusal_hh"

REFUSAL_WITHIN_HARMFUL = "refusal_within_harmful"
REFUSAL_WITHIN_HARMLESS = "refusal_within_harmless"
# Pool strata: +1 harmful (incl. XSTest unsafe), -1 harmless (incl. XSTest safe), 0 neither / unknown.
STRATA = {REFUSAL_WITHIN_HARMFUL: 1, REFUSAL_WITHIN_HARMLESS: -1}

# Which token each carrier is read at (lvs_jax.evals.activations pooling names).
POOLING = {HARMFULNESS: "last_instruction", REFUSAL: "last", REFUSAL_HH: "last", REFUSAL_WITHIN_HARMFUL: "last",
           REFUSAL_WITHIN_HARMLESS: "last"}


class MeanAccumulator:
  """Running mean over the N axis of [L, N, D] chunks, accumulated in float64.

  Chunked float64 sums: each chunk is summed in float64 and added to a float64 total, so the mean of
  10^5 float32 activations is exact to ~1e-12 relative, whatever the chunk order (a float32 running
  sum would lose ~N * 2^-24 relative, and Welford's update is not needed at this precision).
  """

  def __init__(self):
    self.total: np.ndarray | None = None
    self.n = 0

  def update(self, x: np.ndarray) -> MeanAccumulator:
    x = np.asarray(x)
    if x.ndim != 3:
      raise ValueError(f"expected activations [L, N, D], got shape {x.shape}")
    s = x.sum(axis=1, dtype=np.float64)
    if self.total is None:
      self.total = s
    elif self.total.shape != s.shape:
      raise ValueError(f"chunk of shape {x.shape} does not match earlier chunks ([L, D] = {self.total.shape})")
    else:
      self.total += s
    self.n += x.shape[1]
    return self

  @property
  def mean(self) -> np.ndarray:
    """[L, D] float64."""
    if not self.n:
      raise ValueError("mean of no activations")
    return self.total / self.n


def mean_activations(x: np.ndarray, chunk: int = 256) -> np.ndarray:
  """[L, N, D] -> [L, D] float64 mean (MeanAccumulator over chunks of N)."""
  acc = MeanAccumulator()
  for i in range(0, x.shape[1], chunk):
    acc.update(x[:, i:i + chunk])
  return acc.mean


ZERO_RTOL = 1e-4


def activation_scale(x: np.ndarray) -> np.ndarray:
  """[L, N, D] activations -> [L] mean L2 norm of a prompt's activation at each layer."""
  return np.linalg.norm(np.asarray(x, np.float32), axis=-1).mean(-1).astype(np.float64)


def zero_carrier(norms: np.ndarray, scale: np.ndarray, rtol: float = ZERO_RTOL) -> np.ndarray:
  """The one definition of a zero (degenerate) carrier: bool [...] where ||carrier|| <= rtol * scale,
  scale being the mean activation norm of its prompts at that layer and token (`activation_scale`).

  E.g. layer 0 (the embeddings) at t_post_inst, where every prompt has the same template token: the
  difference of means is exactly 0 or float rounding (~1e-6 of the activation norm) and its
  direction is noise. A nan norm counts as zero. Used by candidate selection (`select_layer`) and by
  `lvs_jax.geometry.coupling` (degenerate layers give nan, not noise).
  """
  return ~(np.asarray(norms, np.float64) > rtol * np.asarray(scale, np.float64))


def diff_in_means(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
  """mean(pos) - mean(neg) per layer: pos [L, Np, D], neg [L, Nn, D] -> [L, D] float64."""
  if pos.shape[1] == 0 or neg.shape[1] == 0:
    raise ValueError(f"diff_in_means needs both groups non-empty (got {pos.shape[1]} and {neg.shape[1]})")
  return mean_activations(pos) - mean_activations(neg)


@dataclasses.dataclass
class Carrier:
  """A per-layer carrier and where it came from.

  vectors: [L, D] float32, mean(pos) - mean(neg) in activation units (unnormalized).
  pooling: the token it is read at ("last_instruction" = t_inst, "last" = t_post_inst).
  site: residual-stream site (`lvs_jax.core.edit.SITES`); carrier l is read at layer l of it.
  n_pos, n_neg: prompts in each group. meta: free JSON-able metadata (prompt sets, judge, selection).
  """

  name: str
  vectors: np.ndarray
  pooling: str
  site: str = "resid_pre"
  n_pos: int = 0
  n_neg: int = 0
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def n_layers(self) -> int:
    return self.vectors.shape[0]

  @property
  def norms(self) -> np.ndarray:
    """[L] L2 norm of each layer's carrier (activation units)."""
    return np.linalg.norm(self.vectors.astype(np.float64), axis=-1)

  @property
  def activation_scale(self) -> np.ndarray | None:
    """[L] mean activation norm of the carrier's prompts (meta["activation_scale"]), or None."""
    sc = self.meta.get("activation_scale")
    return None if sc is None else np.asarray(sc, np.float64)

  @property
  def unit(self) -> np.ndarray:
    """[L, D] float32 unit carriers."""
    v = self.vectors.astype(np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)

  @property
  def selected_layer(self) -> int | None:
    sel = self.meta.get("selection") or {}
    return sel.get("layer")


def carrier_from_activations(name: str, pos: np.ndarray, neg: np.ndarray, *, pooling: str | None = None,
                             site: str = "resid_pre", meta: Mapping | None = None) -> Carrier:
  """The carrier of pos vs neg activations ([L, Np, D], [L, Nn, D])."""
  pooling = pooling or POOLING.get(name)
  if pooling is None:
    raise ValueError(f"carrier {name!r}: give pooling= (one of {activations.POOLINGS})")
  v = diff_in_means(pos, neg).astype(np.float32)
  n_pos, n_neg = int(pos.shape[1]), int(neg.shape[1])
  scale = (activation_scale(pos) * n_pos + activation_scale(neg) * n_neg) / (n_pos + n_neg)
  return Carrier(name=name, vectors=v, pooling=pooling, site=site, n_pos=n_pos, n_neg=n_neg,
                 meta=dict(meta or {}, activation_scale=scale.tolist()))


def compute_carrier(model: LoadedModel, name: str, pos_prompts: Sequence[str], neg_prompts: Sequence[str], *,
                    pooling: str | None = None, site: str = "resid_pre", batch_size: int = 16,
                    meta: Mapping | None = None) -> Carrier:
  """Streams activations of both prompt sets through MeanAccumulators -> Carrier (memory O(L * D))."""
  pooling = pooling or POOLING[name]
  means, norms = [], MeanAccumulator()
  for prompts in (pos_prompts, neg_prompts):
    acc = MeanAccumulator()
    prompts = list(prompts)
    for i in range(0, len(prompts), 256):
      x = activations.collect(model, prompts[i:i + 256], pooling=pooling, site=site, batch_size=batch_size)
      acc.update(x)
      norms.update(np.linalg.norm(x, axis=-1, keepdims=True))
    means.append(acc)
  v = (means[0].mean - means[1].mean).astype(np.float32)
  return Carrier(name=name, vectors=v, pooling=pooling, site=site, n_pos=means[0].n, n_neg=means[1].n,
                 meta=dict(meta or {}, activation_scale=norms.mean[:, 0].tolist()))


@functools.partial(jax.jit, static_argnames=("cfg", "site"))
def _inst_and_post(params, tokens, mask, t_inst, cfg, site):
  B, T = tokens.shape
  pos = jnp.stack([t_inst, jnp.full((B,), T - 1, jnp.int32)], axis=1)  # [B, 2]
  out = model_lib.forward(params, tokens, cfg, attention_mask=mask, capture=(site,), capture_positions=pos,
                          logits_positions=jnp.full((B, 1), T - 1, jnp.int32))
  return out.captured[site].astype(jnp.float32)  # [L, B, 2, D]


def collect_inst_post(model: LoadedModel, prompts: Sequence[str], *, site: str = "resid_pre",
                      batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Activations at t_inst and t_post_inst of every layer in one forward pass per batch.

  Returns (x_inst [L, N, D], x_post [L, N, D]) float32 (the same values `activations.collect` gives
  with pooling "last_instruction" and "last").
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("collect_inst_post(): empty prompt set")
  inst, post = [], []
  for chunk, n in batching.pad_batches(prompts, batch_size):
    tokens, mask, _, t_inst, _ = activations.prompt_positions(model.tokenizer, chunk)
    h = np.asarray(_inst_and_post(model.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(t_inst),
                                  model.cfg, site))[:, :n]
    inst.append(h[:, :, 0])
    post.append(h[:, :, 1])
  return np.concatenate(inst, axis=1), np.concatenate(post, axis=1)


def refusal_labels(records: Sequence[Mapping]) -> np.ndarray:
  """bool [N] from behavior.SetResult.records (or any [{"refused": bool}])."""
  return np.array([bool(r["refused"]) for r in records], dtype=bool)


def stratified_refusal_labels(refused: np.ndarray, strata: np.ndarray, min_count: int) -> dict[str, dict]:
  """Labels of the within-stratum refusal contrasts (refused = +1, complied = -1 inside the stratum, 0 elsewhere).

  refused: bool [N]; strata: int [N] (+1 harmful, -1 harmless / XSTest-safe, 0 neither; see `STRATA`).
  Returns {name: {"labels": int64 [N], "stratum", "n", "n_refused", "n_complied", "min_count", "estimable"}},
  estimable = both sides have >= min_count prompts; a stratum that is not estimable still reports its
  counts (e.g. an aligned model refuses every harmful prompt: no complied side to contrast).
  """
  refused, strata = np.asarray(refused, bool), np.asarray(strata)
  if refused.shape != strata.shape:
    raise ValueError(f"stratified_refusal_labels: refused {refused.shape} and strata {strata.shape} differ")
  out = {}
  for name, code in STRATA.items():
    inside = strata == code
    lab = np.where(inside, np.where(refused, 1, -1), 0).astype(np.int64)
    n_ref, n_comp = int((lab == 1).sum()), int((lab == -1).sum())
    out[name] = dict(labels=lab, stratum="harmful" if code == 1 else "harmless", n=int(inside.sum()),
                     n_refused=n_ref, n_complied=n_comp, min_count=int(min_count),
                     estimable=bool(min(n_ref, n_comp) >= max(int(min_count), 1)))
  return out


def matched_vectors(vectors: np.ndarray, scale: np.ndarray, rel_norm: float) -> np.ndarray:
  """Unit carriers scaled to rel_norm x the activation norm at each layer: [L, D], [L] -> [L, D] float32.

  scale [L]: a mean activation norm per layer (`activation_scale`), the *same* for every carrier
  compared, so two carriers' matched vectors have equal norms at every layer whatever their own
  norms, and only the direction differs. A zero carrier (`zero_carrier` against `scale`) gives a zero row.
  """
  v, sc = np.asarray(vectors, np.float64), np.asarray(scale, np.float64)
  if v.ndim != 2 or sc.shape != v.shape[:1]:
    raise ValueError(f"matched_vectors: expected vectors [L, D] and scale [L], got {v.shape} and {sc.shape}")
  norms = np.linalg.norm(v, axis=-1)
  dead = zero_carrier(norms, sc)
  with np.errstate(invalid="ignore", divide="ignore"):
    u = np.where(dead[:, None], 0.0, v / norms[:, None])
  return (u * (rel_norm * sc)[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------- persistence


def save_carriers(path: str | os.PathLike, carriers: Mapping[str, Carrier]) -> tuple[str, str]:
  """Writes `<path>.npz` (one [L, D] float32 array per carrier) and `<path>.json` (the rest).

  Both atomically (temp file + rename). Returns the two paths.
  """
  path = os.fspath(path)
  base = path[:-4] if path.endswith(".npz") or path.endswith(".json") else path
  files.makedirs(os.path.dirname(base) or ".")
  arrays = {name: np.asarray(c.vectors, np.float32) for name, c in carriers.items()}
  info = {name: dict(name=c.name, pooling=c.pooling, site=c.site, n_pos=c.n_pos, n_neg=c.n_neg,
                     shape=list(c.vectors.shape), meta=files.to_jsonable(c.meta, f"carrier {name} meta"))
          for name, c in carriers.items()}
  npz, js = base + ".npz", base + ".json"
  files.atomic_savez(npz, **arrays)
  files.atomic_write_json(js, dict(format="lvs_jax.carriers/1", carriers=info), indent=1)
  return npz, js


def load_carriers(path: str | os.PathLike) -> dict[str, Carrier]:
  """Reads what save_carriers wrote (`path` with or without the .npz/.json suffix)."""
  path = os.fspath(path)
  base = path[:-4] if path.endswith(".npz") else path[:-5] if path.endswith(".json") else path
  with open(base + ".json") as f:
    info = json.load(f)
  if info.get("format") != "lvs_jax.carriers/1":
    raise ValueError(f"{base}.json is not an lvs_jax carriers file")
  out = {}
  with np.load(base + ".npz", allow_pickle=False) as z:
    for name, m in info["carriers"].items():
      v = z[name]
      if list(v.shape) != m["shape"]:
        raise ValueError(f"{base}.npz: carrier {name!r} has shape {v.shape}, metadata says {m['shape']}")
      out[name] = Carrier(name=m["name"], vectors=v, pooling=m["pooling"], site=m["site"], n_pos=m["n_pos"],
                          n_neg=m["n_neg"], meta=m["meta"])
  return out


# ----------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  """refusal_direction's filters (select_direction.py defaults)."""

  kl_threshold: float = 0.1  # nats: max KL(clean || ablated) of the next token on harmless prompts
  induce_refusal_threshold: float = 0.0  # min mean refusal score on harmless prompts with the carrier added
  prune_layer_fraction: float = 0.2  # discard candidates in the last 20% of layers


def candidate_scores(model: LoadedModel, carrier: Carrier, harmful: Sequence[str], harmless: Sequence[str], *,
                     layers: Sequence[int] | None = None, batch_size: int = 16, chunk: int = 4) -> dict:
  """Evaluates each layer's carrier as a candidate direction (one compiled sweep per quantity).

  Returns per candidate layer ([nC] float64, means over prompts):
    ablation_refusal  refusal score on `harmful` with the direction ablated at every layer and site
    ablation_kl       KL(clean || ablated) of the next token on `harmless` (nats)
    steering_refusal  refusal score on `harmless` with the raw carrier added at resid_pre of its layer
                      (coefficient 1, every prompt position)
  plus "layers" [nC] and the clean baselines "harmful_refusal", "harmless_refusal".
  """
  layers = list(range(carrier.n_layers)) if layers is None else list(layers)
  ids = jnp.asarray(judges.refusal_token_ids(model.tokenizer))
  dirs = jnp.asarray(carrier.vectors[np.asarray(layers)])  # [nC, D]
  out = {"layers": np.asarray(layers)}
  for name, prompts in (("harmful", harmful), ("harmless", harmless)):
    res = causal.ablation_sweep_prompts(model, prompts, dirs, ids, batch_size=batch_size, chunk=chunk)
    out[f"{name}_refusal"] = float(np.mean(res["clean_refusal_score"]))
    if name == "harmful":
      out["ablation_refusal"] = res["refusal_score"].mean(-1)
    else:
      out["ablation_kl"] = res["kl"].mean(-1)
  vec = jnp.asarray(carrier.vectors)[None]  # [1, L, D]
  res = causal.add_sweep_prompts(model, harmless, jnp.asarray(layers), jnp.ones((1,)), vec, ids, batch_size=batch_size,
                                 chunk=chunk)
  out["steering_refusal"] = res["refusal_score"][:, 0, 0].mean(-1)
  out.update(zero_check_scores(carrier, layers))
  return out


def _degenerate(scores: Mapping) -> np.ndarray:
  """[n] `zero_carrier` of each candidate: at resid_pre of layer 0 the last prompt token is the same
  template token in every prompt, so its difference in means is exactly 0, ablating it does nothing,
  and it would pass the KL filter. Needs scores["norms"] and scores["scale"] (`zero_check_scores`);
  without them no candidate is flagged."""
  n = len(np.asarray(scores["layers"]))
  if "norms" not in scores or "scale" not in scores:
    return np.zeros(n, bool)
  return zero_carrier(scores["norms"], scores["scale"])


def zero_check_scores(carrier: Carrier, layers) -> dict:
  """{"norms", "scale"} [n] of the carrier at `layers`, for `select_layer` / `fallback_layer` (empty when
  the carrier does not record its activation scale, e.g. loaded from an older file)."""
  layers = np.asarray(layers)
  if carrier.activation_scale is None:
    return {}
  return dict(norms=carrier.norms[layers], scale=carrier.activation_scale[layers])


def select_layer(scores: Mapping, n_layers: int, cfg: SelectionConfig = SelectionConfig()) -> dict:
  """refusal_direction's choice from `candidate_scores` output -> selection metadata.

  Returns {"layer": int or None (None when every candidate is filtered), "candidates": [per-layer
  dict with the scores and "discarded": reason or None], "config": {...}}.
  """
  cands = []
  cutoff = int(n_layers * (1.0 - cfg.prune_layer_fraction))
  zero = _degenerate(scores)
  for i, layer in enumerate(np.asarray(scores["layers"]).tolist()):
    a, k, s = (float(scores[key][i]) for key in ("ablation_refusal", "ablation_kl", "steering_refusal"))
    reason = None
    if any(math.isnan(x) for x in (a, k, s)):
      reason = "nan"
    elif zero[i]:
      reason = "zero carrier (the token is the same in every prompt at this layer)"
    elif layer >= cutoff:
      reason = f"layer >= {cutoff} (last {cfg.prune_layer_fraction:.0%})"
    elif k > cfg.kl_threshold:
      reason = f"ablation KL {k:.3g} > {cfg.kl_threshold}"
    elif s < cfg.induce_refusal_threshold:
      reason = f"steering refusal score {s:.3g} < {cfg.induce_refusal_threshold}"
    cands.append(dict(layer=int(layer), ablation_refusal=a, ablation_kl=k, steering_refusal=s, discarded=reason))
  kept = [c for c in cands if c["discarded"] is None]
  best = min(kept, key=lambda c: c["ablation_refusal"])["layer"] if kept else None
  return dict(layer=best, candidates=cands, config=dataclasses.asdict(cfg),
              harmful_refusal=float(scores.get("harmful_refusal", math.nan)),
              harmless_refusal=float(scores.get("harmless_refusal", math.nan)))


def fallback_layer(scores: Mapping, n_layers: int, cfg: SelectionConfig = SelectionConfig()) -> tuple[int, str]:
  """When every candidate is filtered, relax the filters in a fixed order -> (layer, rule).

  1. "no_steering_filter": the lowest ablated refusal score among unpruned candidates with ablation
     KL <= kl_threshold (the steering threshold of 0 log-odds is unreachable for a model that refuses
     almost nothing, like SmolLM2-135M-Instruct);
  2. "min_kl": otherwise the unpruned candidate whose ablation disturbs harmless prompts least (taking
     the lowest ablated refusal score among broken candidates would pick the layer that breaks the
     model most, whose "refusal drop" is just damage).
  """
  cutoff = int(n_layers * (1.0 - cfg.prune_layer_fraction))
  layers = np.asarray(scores["layers"])
  a = np.asarray(scores["ablation_refusal"], float)
  k = np.asarray(scores["ablation_kl"], float)
  usable = np.isfinite(a) & np.isfinite(k) & ~_degenerate(scores)
  ok = (layers < cutoff) & usable
  if not ok.any():
    ok = usable
  if not ok.any():
    return int(layers[0]), "first"
  low_kl = ok & (k <= cfg.kl_threshold)
  if low_kl.any():
    return int(layers[low_kl][np.argmin(a[low_kl])]), "no_steering_filter"
  return int(layers[ok][np.argmin(k[ok])]), "min_kl"


def ablation_edit(carrier: Carrier | np.ndarray, *, layer: int | None = None, per_layer: bool = False,
                  layers=None, sites=("resid_pre", "attn_out", "mlp_out", "resid_post"), positions=None):
  """Edit that projects a carrier out of the residual stream.

  per_layer=False: the direction of `layer` (default: the selected layer) ablated at every layer
  (refusal_direction's directional ablation). per_layer=True: at each layer l its own carrier l.
  layers: restrict to these layers (default all). positions: [B|1, S] 0/1 slot mask (default all).
  """
  vecs = carrier.vectors if isinstance(carrier, Carrier) else np.asarray(carrier)
  n_layers = vecs.shape[0]
  if not per_layer:
    if layer is None:
      layer = carrier.selected_layer if isinstance(carrier, Carrier) else None
    if layer is None:
      raise ValueError("ablation_edit: give layer= (the carrier has no selected layer)")
    vecs = vecs[layer]
  return edit_lib.ablate_directions(n_layers, jnp.asarray(vecs), layers=layers, sites=sites, positions=positions,
                                    per_layer=per_layer)


__all__ = [
  "HARMFULNESS", "REFUSAL", "REFUSAL_HH", "POOLING", "MeanAccumulator", "mean_activations", "diff_in_means",
  "Carrier", "carrier_from_activations", "compute_carrier", "collect_inst_post", "refusal_labels", "save_carriers",
  "load_carriers",
  "SelectionConfig", "candidate_scores", "select_layer", "fallback_layer", "ablation_edit", "ZERO_RTOL",
  "activation_scale", "zero_carrier", "zero_check_scores", "REFUSAL_WITHIN_HARMFUL", "REFUSAL_WITHIN_HARMLESS",
  "STRATA", "stratified_refusal_labels", "matched_vectors",
]
