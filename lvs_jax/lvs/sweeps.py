"""Compiled perturbation sweeps over layers x magnitudes x directions, reusing the clean prefix.

A perturbation adds `m * d` to the residual stream entering layer l (site resid_pre) at the prompt
positions of every prompt, for every cell (l, m, d) of a grid. Magnitudes are **relative** by
default: the vector added at token t is m * ||h_t|| * d with d a unit direction and ||h_t|| the
clean activation norm at that layer and token (so m = 0.1 adds 10% of the activation norm);
`relative=False` makes m an absolute L2 norm.

Per cell and prompt the sweep returns:
  refusal_delta   change of the logit refusal score at the last prompt token (nats; judges.refusal_score)
  target_logprob  log p(target continuation | prompt) summed over target tokens (nats)
  kl              KL(clean || perturbed) of the next-token distribution at the last prompt token (nats)

Layers below l do not depend on the perturbation, so the sweep runs one clean pass capturing the
residual at every layer, then for each layer l runs only layers l..L-1 from that cached residual:
a sequential `lax.map` over layers whose scan skips layers < l with `lax.cond` (the predicate is a
scalar there, so the skip is real), and inside it a chunked `lax.map(batch_size=)` (a vmap per
chunk) over the (magnitude, direction) cells. The whole grid is one jitted function: one trace.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig
from lvs_jax.core.tokenizer import PromptError, Tokenizer
from lvs_jax.evals import judges


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SweepBatch:
  """Prompts (left-padded, chat-formatted) followed by right-padded target continuations.

  tokens, mask: [B, Tp + Tt]; prompt_mask: [B, Tp + Tt] 1 on real prompt tokens (where perturbations
  apply); target_mask: [B, Tt] 1 on real target tokens; n_prompt: Tp (static).
  """

  tokens: jax.Array
  mask: jax.Array
  prompt_mask: jax.Array
  target_mask: jax.Array
  n_prompt: int = dataclasses.field(metadata=dict(static=True))

  @property
  def last(self) -> int:
    return self.n_prompt - 1


def make_batch(
  tokenizer: Tokenizer, prompts, targets=None, *, chat: bool = True, pad_to_multiple: int = 16,
) -> SweepBatch:
  """Builds a SweepBatch. targets: one continuation per prompt (e.g. AdvBench "Sure, here is ..."),
  or None (a single end-of-turn token is used so target metrics are defined but uninformative)."""
  prompts = list(prompts)
  if not prompts:
    raise PromptError("make_batch(): empty prompt set")
  if targets is not None and len(targets) != len(prompts):
    raise ValueError(f"make_batch(): {len(targets)} targets for {len(prompts)} prompts")
  formatted = [tokenizer.format_chat(p) if chat else p for p in prompts]
  ptoks, pmask = tokenizer.batch(formatted, pad_to_multiple=pad_to_multiple)
  if targets is None:
    tids = [[tokenizer.eos_ids[0]]] * len(prompts)
  else:
    tids = [tokenizer.encode(t) for t in targets]
    for i, t in enumerate(tids):
      if not t:
        raise PromptError(f"make_batch(): target {i} is empty")
  tt = -(-max(len(t) for t in tids) // 8) * 8
  ttoks = np.full((len(prompts), tt), tokenizer.pad_id, np.int32)
  tmask = np.zeros((len(prompts), tt), np.int32)
  for i, t in enumerate(tids):
    ttoks[i, :len(t)] = t
    tmask[i, :len(t)] = 1
  tokens = np.concatenate([ptoks, ttoks], 1)
  mask = np.concatenate([pmask, tmask], 1)
  prompt_mask = np.concatenate([pmask, np.zeros_like(tmask)], 1)
  return SweepBatch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(prompt_mask), jnp.asarray(tmask),
                    ptoks.shape[1])


def readout_positions(batch: SweepBatch) -> jax.Array:
  """[B, Tt] positions whose logits predict the target tokens; the first is the last prompt token."""
  B, tt = batch.target_mask.shape
  return jnp.broadcast_to(batch.last + jnp.arange(tt), (B, tt)).astype(jnp.int32)


def metrics_from_logits(logits: jax.Array, batch: SweepBatch, refusal_ids: jax.Array) -> dict:
  """logits: [B, Tt, V] at readout_positions -> per-prompt metrics [B] (see module docstring)."""
  logp = jax.nn.log_softmax(logits.astype(model_lib.acc_dtype(logits.dtype)), axis=-1)
  targets = jax.lax.dynamic_slice_in_dim(batch.tokens, batch.n_prompt, logits.shape[1], axis=1)
  tok_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  w = batch.target_mask.astype(logp.dtype)
  return dict(
    refusal_score=judges.refusal_score(logits[:, 0], refusal_ids),
    target_logprob=(tok_lp * w).sum(-1),
    target_nll_per_token=-(tok_lp * w).sum(-1) / w.sum(-1),
    logp_last=logp[:, 0],
  )


def clean_pass(params, cfg: ModelConfig, batch: SweepBatch, refusal_ids: jax.Array):
  """(resid_pre [L, B, T, D], metrics) of the unperturbed model."""
  out = model_lib.forward(params, batch.tokens, cfg, attention_mask=batch.mask, capture=("resid_pre",),
                          logits_positions=readout_positions(batch))
  return out.captured["resid_pre"], metrics_from_logits(out.logits, batch, refusal_ids)


def run_from_layer(params, cfg: ModelConfig, ctx: model_lib.Context, h: jax.Array, layer: jax.Array) -> jax.Array:
  """Runs blocks layer..L-1 on h [B, T, D] (the residual entering `layer`); blocks < layer are skipped.

  The skip is a `lax.cond` per layer: real when `layer` is unbatched (under lax.map), a select when
  vmapped over layers. Differentiable in h.
  """
  return model_lib.scan_layers(params.layers, h, cfg, ctx, from_layer=layer)[0]


def next_token_kl(logp_ref: jax.Array, logp: jax.Array) -> jax.Array:
  """KL(ref || other) in nats over the last axis, from log-probabilities [..., V] -> [...]."""
  return jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp), -1)


def edited_metrics(params, cfg: ModelConfig, batch: SweepBatch, refusal_ids: jax.Array, clean: dict,
                   h: jax.Array | None = None, edit=None) -> dict:
  """Per-prompt metrics [B] of an edited run, with kl against the clean pass (`clean`, from clean_pass).

  Either h [B, T, D] is the final residual stream (the run already done, e.g. by run_from_layer) or,
  with h None, the whole model runs under `edit`."""
  pos = readout_positions(batch)
  if h is None:
    logits = model_lib.forward(params, batch.tokens, cfg, attention_mask=batch.mask, edit=edit,
                               logits_positions=pos).logits
  else:
    logits = model_lib.unembed(params, h, cfg, pos)
  met = metrics_from_logits(logits, batch, refusal_ids)
  return dict(met, kl=next_token_kl(clean["logp_last"], met.pop("logp_last")))


def with_clean(res: dict, clean: dict) -> dict:
  """Adds refusal_delta (edited - clean refusal score) and the clean metrics as clean_* ([B])."""
  res["refusal_delta"] = res["refusal_score"] - clean["refusal_score"]
  res.update({f"clean_{k}": v for k, v in clean.items() if k != "logp_last"})
  return res


def token_scale(h: jax.Array, relative: bool) -> jax.Array:
  """[B, T, 1] multiplier that turns a magnitude into activation units: ||h_t|| (relative) or 1."""
  if not relative:
    return jnp.ones((*h.shape[:2], 1), jnp.float32)
  return jnp.linalg.norm(h.astype(jnp.float32), axis=-1, keepdims=True)


def random_directions(key: jax.Array, n: int, d_model: int) -> jax.Array:
  """[n, D] random unit directions (isotropic Gaussian, normalized)."""
  x = jax.random.normal(key, (n, d_model), jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def with_negatives(directions: jax.Array) -> jax.Array:
  """[n, ...] -> [2n, ...]: the directions followed by their negatives."""
  return jnp.concatenate([directions, -directions], axis=0)


def _per_layer_dirs(directions: jax.Array, n_layers: int, normalize: bool = True) -> jax.Array:
  """[nD, D] (same at every layer) or [nD, L, D] (per-layer, e.g. carriers) -> [nD, L, D], unit norm
  unless normalize=False."""
  d = jnp.asarray(directions, jnp.float32)
  if d.ndim == 2:
    d = jnp.broadcast_to(d[:, None], (d.shape[0], n_layers, d.shape[1]))
  if d.ndim != 3 or d.shape[1] != n_layers:
    raise ValueError(f"directions must be [nD, D] or [nD, L={n_layers}, D], got shape {tuple(d.shape)}")
  return d / jnp.linalg.norm(d, axis=-1, keepdims=True) if normalize else d


@functools.partial(jax.jit, static_argnames=("cfg", "relative", "normalize", "last_only", "chunk"))
def sweep(
  params,
  cfg: ModelConfig,
  batch: SweepBatch,
  layers: jax.Array,
  magnitudes: jax.Array,
  directions: jax.Array,
  refusal_ids: jax.Array,
  *,
  relative: bool = True,
  normalize: bool = True,
  last_only: bool = False,
  chunk: int = 8,
) -> dict:
  """Evaluates every (layer, magnitude, direction) cell on the batch.

  layers: [nL] int; magnitudes: [nM] (relative to ||h_t|| unless relative=False); directions:
  [nD, D] or [nD, L, D] (normalized here unless normalize=False: with relative=False and
  normalize=False, magnitude m adds m * directions[d, l] in the vector's own units, the carriers'
  activation addition `lvs_jax.geometry.causal.add_sweep`). last_only: perturb only the last prompt
  token instead of every prompt token. chunk: cells evaluated at once (memory ~ chunk * B * T * D
  activations). Returns {refusal_delta, target_logprob, kl, refusal_score, ...} each [nL, nM, nD, B],
  plus the clean metrics under "clean_*" ([B]).
  """
  dirs = _per_layer_dirs(directions, cfg.n_layers, normalize)
  resid, clean = clean_pass(params, cfg, batch, refusal_ids)
  ctx = model_lib.context(batch.mask, cfg)
  where = batch.prompt_mask.astype(jnp.float32)
  if last_only:
    where = jnp.zeros_like(where).at[:, batch.last].set(1.0)
  nM, nD = magnitudes.shape[0], dirs.shape[0]
  grid_m = jnp.repeat(magnitudes.astype(jnp.float32), nD)
  grid_d = jnp.tile(jnp.arange(nD), nM)

  def per_layer(layer):
    hl = jax.lax.dynamic_index_in_dim(resid, layer, keepdims=False)  # [B, T, D]
    scale = token_scale(hl, relative) * where[..., None]

    def cell(md):
      m, di = md
      d = jax.lax.dynamic_index_in_dim(dirs, di, keepdims=False)[layer]  # [D]
      h = hl + (m * scale * d).astype(hl.dtype)
      return edited_metrics(params, cfg, batch, refusal_ids, clean, h=run_from_layer(params, cfg, ctx, h, layer))

    out = jax.lax.map(cell, (grid_m, grid_d), batch_size=chunk)
    return jax.tree.map(lambda x: x.reshape(nM, nD, *x.shape[1:]), out)

  return with_clean(jax.lax.map(per_layer, jnp.asarray(layers, jnp.int32)), clean)
