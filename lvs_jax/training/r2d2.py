"""R2D2 adversarial fine-tuning (Mazeika et al. 2024, "HarmBench", sec. 5) and its matched SFT baseline.

As HarmBench's `adversarial_training/adv_training.py` runs it (constants in experiments/configs/r2d2.py):

  pool        a persistent set of test cases (behavior, GCG target, adversarial suffix), the suffix
              initialized to "! " x U[15, 20]; every `reset_every` steps `reset_fraction` of the pool
              is replaced by fresh behaviors with fresh suffixes.
  inner loop  each step, `cases_per_step` pool entries get `gcg_steps` GCG steps against the
              *current* parameters (the compiled kernels of `lvs_jax.attacks.gcg`, the weights passed
              as a jit argument: no recompilation per step);
  outer step  one optimizer step on  w_sft * CE(benign chat batch)
                                    + w_away * away(behavior + suffix -> GCG target)
                                    + w_toward * CE(behavior + suffix -> "Sorry, I can't do that." + EOS),
              each term a mean over its own tokens, gradients of the terms summed (HarmBench backpropagates
              them separately); away = HarmBench's `log_1_minus_p_loss` (`away_loss_sums`).

The matched SFT baseline (`adversarial=False`): the same start, the same benign batches, the same pool of
behaviors (same draws, same resets) and the same refusal target on them, the same schedule; the refusal
is taught on the behavior *without* a suffix and there is no inner attack and no away term. So the two
runs differ exactly in R2D2's attack and its away/toward-under-attack losses.

Everything random is a pure function of (seed, step) (`_rng`, `_key`): benign batches (`core.Dataset`),
the entries updated, the pool resets, the GCG candidates. The checkpoint (`R2D2State`) holds the
TrainState and the pool, so a run killed at any moment resumes bit-identically.
Shapes: N pool entries, S = `max_suffix` suffix slots, K entries per step, W candidates, n suffix tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lvs_jax.attacks import common, gcg
from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig
from lvs_jax.io import datasets as data_lib
from lvs_jax.io import files
from lvs_jax.training import core as training
from lvs_jax.training import lora as lora_lib

REFUSAL = "Sorry, I can't do that."  # HarmBench adv_training.py: the toward target (+ the EOS token)
KIND = "r2d2"  # checkpoint metadata "kind": how `recipes.checkpoint_params` restores the state
_INIT, _RESET, _SELECT, _GCG = 1, 2, 3, 4  # salts of the per-step random streams


# --- Losses -----------------------------------------------------------------------------------------


def away_loss_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                   threshold: float = -5.0) -> tuple[jax.Array, jax.Array]:
  """(sum over target tokens of -log(1 - p), number of target tokens): HarmBench's `log_1_minus_p_loss`.

  logits [B, T, V], targets [B, T], mask [B, T] (1 = a target token). p = softmax(logits)[target];
  log(1 - p) = logsumexp(logits without the target) - logsumexp(logits) (the target's logit replaced by
  -1e10, as HarmBench does). Tokens with log p < threshold contribute 0 but still count in the
  denominator; the loss HarmBench minimizes is sum / count (positive; it pushes p down).
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.bool_)
  log_p = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1) - lse
  log_1mp = jax.nn.logsumexp(jnp.where(onehot, -1e10, logits), axis=-1) - lse
  m = mask.astype(jnp.float32)
  keep = jnp.where(log_p < threshold, 0.0, m)
  return -jnp.sum(log_1mp * keep), jnp.sum(m)


def away_sums(trainable, base, batch: training.Batch, cfg: ModelConfig, *, threshold: float = -5.0,
              compute_dtype=jnp.float32, remat: bool = True, edit=None) -> tuple[jax.Array, jax.Array]:
  """`away_loss_sums` of a training batch (fields [b, T]) under the model (`core.loss_sums`'s conventions)."""
  lora = None
  if isinstance(trainable, lora_lib.LoraParams):
    trainable, lora = base, trainable
  params = training._cast(trainable, compute_dtype)
  logits = training.forward_train(params, batch.tokens, batch.segment_ids, batch.positions, cfg, remat=remat,
                                  lora=lora, edit=edit)
  return away_loss_sums(logits, batch.targets, batch.loss_mask, threshold)


# --- The train step ---------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
  """One R2D2 step's data. clean: the benign batch, fields [k, b, T]; toward: the refusal rows, fields
  [K, T2]; away: the GCG-target rows [K, T2] (None in the SFT baseline)."""

  clean: training.Batch
  toward: training.Batch | None
  away: training.Batch | None


def make_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, base: model_lib.Params | None = None, *,
              weights: dict[str, float], threshold: float = -5.0, schedule: optax.Schedule | None = None,
              compute_dtype=jnp.float32, remat: bool = True, donate: bool = True,
              perturb: Callable | None = None) -> Callable:
  """A jitted `step(state, StepBatch) -> (state, metrics)` (state donated).

  Gradient = sum over terms of weight * d(term mean)/d params; terms of weight 0 (or without data) are
  left out of the program. The clean term is `core.make_train_step`'s computation (micro-batches
  scanned, gradients summed then divided by the completion-token count), so with only that term (the
  adversarial terms off) this step is the SFT step bit for bit (tested). metrics: loss (the weighted
  total), sft, toward, away (term means, nats/token), tokens, grad_norm, lr.

  perturb: `perturb(trainable, base, data, key) -> (edit, metrics)`, a latent perturbation found against
  the current parameters (latent adversarial training, `lvs_jax.training.lat`): the toward and away terms
  are computed under `edit` (held fixed: no gradient flows into the perturbation), the clean term is
  not; its metrics are added with an "adv_" prefix. key: from the state's rng (a pure function of the
  seed and the step).
  weights["contrast"] (default 0): CE of the away rows' completions on the clean input (no edit) - with
  `perturb`, the same prompts' other answer when unperturbed (latent dissociation: refuse clean, comply under
  the perturbation, in one batch).
  """
  w_sft, w_tow, w_away, w_con = (float(weights.get(k, 0.0)) for k in ("sft", "toward", "away", "contrast"))

  def clean_grads(params, batch, base):
    grad_fn = jax.value_and_grad(training.loss_sums, has_aux=True)

    def micro(carry, mb):
      g_acc, nll_acc, n_acc = carry
      (nll, (n, _)), g = grad_fn(params, base, mb, cfg, compute_dtype=compute_dtype, remat=remat)
      return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

    zero = jnp.zeros((), jnp.float32)
    (g, nll, n), _ = jax.lax.scan(micro, (jax.tree.map(jnp.zeros_like, params), zero, zero), batch)
    denom = jnp.maximum(n, 1.0)
    return jax.tree.map(lambda x: x / denom.astype(x.dtype), g), nll / denom, n

  def term_grads(fn, params, batch, base):
    (s, n), g = jax.value_and_grad(fn, has_aux=True)(params, base, batch)
    denom = jnp.maximum(n, 1.0)
    return jax.tree.map(lambda x: x / denom.astype(x.dtype), g), s / denom

  def step(state: training.TrainState, data: StepBatch, base):
    edit = None
    metrics = {}
    if perturb is not None:
      edit, adv = perturb(state.params, base, data, jax.random.fold_in(state.rng, 1))
      edit = jax.lax.stop_gradient(edit)
      metrics.update({f"adv_{k}": v for k, v in adv.items()})

    def ce(p, b, batch, e=edit):  # e=None: on the clean input (the contrast term)
      s, (n, _) = training.loss_sums(p, b, batch, cfg, compute_dtype=compute_dtype, remat=remat, edit=e)
      return s, n

    def aw(p, b, batch):
      return away_sums(p, b, batch, cfg, threshold=threshold, compute_dtype=compute_dtype, remat=remat, edit=edit)

    g, sft, n = clean_grads(state.params, data.clean, base)
    if w_sft != 1.0:
      g = jax.tree.map(lambda x: x * jnp.asarray(w_sft, x.dtype), g)
    metrics.update(sft=sft, tokens=n)
    loss = w_sft * sft
    extra = []
    if w_tow and data.toward is not None:
      gt, metrics["toward"] = term_grads(ce, state.params, data.toward, base)
      extra.append((w_tow, gt))
      loss = loss + w_tow * metrics["toward"]
    if w_away and data.away is not None:
      ga, metrics["away"] = term_grads(aw, state.params, data.away, base)
      extra.append((w_away, ga))
      loss = loss + w_away * metrics["away"]
    if w_con and data.away is not None:  # the away rows' completions on the *clean* input (no edit)
      gc, metrics["contrast"] = term_grads(functools.partial(ce, e=None), state.params, data.away, base)
      extra.append((w_con, gc))
      loss = loss + w_con * metrics["contrast"]
    for w, gx in extra:
      g = jax.tree.map(lambda a, b, w=w: a + jnp.asarray(w, b.dtype) * b, g, gx)
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(g, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    rng, _ = jax.random.split(state.rng)
    metrics.update(loss=loss, grad_norm=optax.global_norm(g))
    return training.TrainState(state.step + 1, params, opt_state, rng), metrics

  jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
  return lambda state, data: jitted(state, data, base)


# --- The pool ---------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
  """The persistent test cases, host numpy (checkpointed with the state). uid [N]: a new id per fresh
  entry; behavior [N]: index into the run's behaviors (and targets); n_bang [N]: the "! " count of the
  entry's initial suffix; suffix [N, S] in-context suffix token ids (0-padded), suffix_len [N] (0 in
  the SFT baseline); drawn [] int32: behaviors drawn so far from the seeded behavior stream."""

  uid: Any
  behavior: Any
  n_bang: Any
  suffix: Any
  suffix_len: Any
  drawn: Any

  def entries(self) -> list[dict]:
    return [dict(uid=int(self.uid[i]), behavior=int(self.behavior[i]),
                 suffix=[int(t) for t in self.suffix[i, :int(self.suffix_len[i])]]) for i in range(len(self.uid))]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class R2D2State:
  """What a checkpoint holds: the TrainState and the pool."""

  train: training.TrainState
  pool: Pool

  @property
  def step(self):
    return self.train.step


def _rng(seed: int, step: int, salt: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(step), salt])


def _key(seed: int, step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), _GCG)


def behavior_stream(n: int, seed: int, start: int, count: int) -> np.ndarray:
  """Behaviors [count] number start.. of the endless seeded stream (each epoch a permutation of 0..n-1)."""
  idx = np.arange(start, start + count)
  out = np.empty(count, np.int32)
  for e in np.unique(idx // n):
    sel = idx // n == e
    out[sel] = data_lib._permutation(n, seed * 1_000_003 + 7919 + int(e))[idx[sel] % n]
  return out


def fixed_len(n: int, fixed: int, multiple: int) -> int:
  """`fixed` when n fits (one compiled shape), else n rounded up to `multiple` (a rare extra compile)."""
  return int(fixed) if n <= fixed else -(-n // multiple) * multiple


def pad_batch(b: gcg.Batch, prompt_len: int, rest_len: int, multiple: int, pad_id: int) -> gcg.Batch:
  """A GCG batch with the prefix left-padded to `fixed_len(Tb, prompt_len)` and the rest right-padded
  to `fixed_len(R, rest_len)` (padding masked out: the losses are unchanged)."""
  P, Tb = b.before.shape
  R = b.rest.shape[1]
  tb, r = fixed_len(Tb, prompt_len, multiple), fixed_len(R, rest_len, multiple)
  left = lambda x, v: jnp.pad(x, ((0, 0), (tb - Tb, 0)), constant_values=v)  # noqa: E731
  right = lambda x, v: jnp.pad(x, ((0, 0), (0, r - R)), constant_values=v)  # noqa: E731
  return gcg.Batch(left(b.before, pad_id), left(b.before_mask, 0), right(b.rest, pad_id), right(b.rest_mask, 0),
                   b.tgt_pos, b.labels, b.weights)


class Trainer:
  """Pool, inner attack, batches and the loop of one run (R2D2 or its SFT baseline).

  model: the LoadedModel (frozen base for LoRA); behaviors/targets: the training behaviors and their
  GCG targets; benign: tokenized benign chat examples (`core.tokenize`); cfg: a config of
  experiments/configs/r2d2.py.
  """

  def __init__(self, model, behaviors: Sequence[str], targets: Sequence[str], benign: Sequence[training.Tokenized],
               cfg):
    if len(behaviors) != len(targets) or not behaviors:
      raise ValueError(f"need one target per behavior and at least one (got {len(behaviors)}, {len(targets)})")
    self.model, self.cfg, self.r = model, cfg, cfg.r2d2
    self.behaviors, self.targets = list(behaviors), list(targets)
    self.tok = model.tokenizer
    self.adversarial = bool(cfg.adversarial)
    b = cfg.batch
    self.dataset = training.Dataset(benign, batch_size=b.batch_size, seq_len=b.seq_len, pad_id=self.tok.pad_id,
                                    seed=cfg.seed, micro_batches=b.micro_batches, packing=b.packing)
    self.eot = training.end_of_turn_id(self.tok)
    self.refusal_ids = self.tok.encode(self.r.refusal)
    self._layouts: dict[tuple[int, int], common.PromptLayout] = {}
    self._plain: dict[int, list[int]] = {}
    self.banned = None
    self._merge = jax.jit(lambda t, b: training.model_params(t, b))

  # -- pool ------------------------------------------------------------------------------------------

  def layout(self, behavior: int, n_bang: int) -> common.PromptLayout:
    k = (behavior, n_bang)
    if k not in self._layouts:
      init = " ".join(["!"] * n_bang)  # "! " x n, without the trailing space (split_prompt adds none)
      self._layouts[k] = common.split_prompt(self.tok, self.behaviors[behavior], init, self.targets[behavior],
                                             message=self.r.message)
      n = len(self._layouts[k].suffix_ids)
      if n > self.r.max_suffix:
        raise ValueError(f"the initial suffix of {n_bang} '!' is {n} tokens in context, more than "
                         f"r2d2.max_suffix={self.r.max_suffix}")
    return self._layouts[k]

  def _fresh(self, n: int, seed_step: int, salt: int, drawn: int, uid0: int):
    """n fresh entries: behaviors drawn from the stream, suffixes "! " x U[lo, hi] (none in the SFT baseline)."""
    beh = behavior_stream(len(self.behaviors), self.cfg.seed, drawn, n)
    lo, hi = self.r.suffix_bangs
    bangs = _rng(self.cfg.seed, seed_step, salt).integers(lo, hi + 1, n).astype(np.int32)
    suffix = np.zeros((n, self.r.max_suffix), np.int32)
    lens = np.zeros(n, np.int32)
    if self.adversarial:
      for i in range(n):
        ids = self.layout(int(beh[i]), int(bangs[i])).suffix_ids
        suffix[i, :len(ids)], lens[i] = ids, len(ids)
    return np.arange(uid0, uid0 + n, dtype=np.int32), beh, bangs, suffix, lens

  def init_pool(self) -> Pool:
    N = int(self.r.pool_size)
    uid, beh, bangs, suffix, lens = self._fresh(N, 0, _INIT, 0, 0)
    return Pool(uid, beh, bangs, suffix, lens, np.asarray(N, np.int32))

  def maybe_reset(self, pool: Pool, step: int) -> Pool:
    """At step > 0 with step % reset_every == 0: round(reset_fraction * N) random entries replaced by fresh ones."""
    if step <= 0 or step % self.r.reset_every:
      return pool
    N = len(pool.uid)
    k = int(round(self.r.reset_fraction * N))
    which = np.sort(_rng(self.cfg.seed, step, _RESET).choice(N, k, replace=False))
    uid0 = int(pool.uid.max()) + 1
    new = self._fresh(k, step, _RESET + 100, int(pool.drawn), uid0)
    arrays = [np.array(x, copy=True) for x in (pool.uid, pool.behavior, pool.n_bang, pool.suffix, pool.suffix_len)]
    for a, v in zip(arrays, new):
      a[which] = v
    return Pool(*arrays, np.asarray(int(pool.drawn) + k, np.int32))

  def select(self, step: int) -> np.ndarray:
    """The entries updated (and trained on) at `step`: K distinct, seeded by (seed, step)."""
    N = int(self.r.pool_size)
    return np.sort(_rng(self.cfg.seed, step, _SELECT).choice(N, min(self.r.cases_per_step, N), replace=False))

  # -- inner attack ----------------------------------------------------------------------------------

  def attack(self, params: model_lib.Params, pool: Pool, which: np.ndarray, step: int) -> Pool:
    """`gcg_steps` GCG steps on each selected entry against `params` -> the pool with their new suffixes.

    One entry at a time (suffix lengths differ); the prefix padded to `prompt_len` and the rest to
    `rest_len` slots (`fixed_len`), so the kernels compile once per suffix length (a handful for the
    whole run) and never again.
    """
    g = self.r
    mcfg = self.model.cfg
    if self.banned is None:
      self.banned = jnp.asarray(common.banned_tokens(self.tok, mcfg.vocab_size, g.allow_non_ascii))
    topk = int(min(g.topk, int((~np.asarray(self.banned)).sum())))
    W, chunk = int(g.search_width), int(g.chunk)
    n_pad = -(-W // chunk) * chunk
    suffix, lens = np.array(pool.suffix, copy=True), np.array(pool.suffix_len, copy=True)
    key = _key(self.cfg.seed, step)
    for e in which:
      n = int(lens[e])
      lay = dataclasses.replace(self.layout(int(pool.behavior[e]), int(pool.n_bang[e])),
                                suffix_ids=[int(t) for t in suffix[e, :n]])
      batch = pad_batch(gcg.make_batch([lay], self.tok.pad_id, multiple=1), g.prompt_len, g.rest_len,
                        g.pad_multiple, self.tok.pad_id)
      cache = gcg.prefix_cache(params, mcfg, batch)
      cur = np.asarray(suffix[e, :n], np.int32)
      for t in range(g.gcg_steps):
        sub = jax.random.fold_in(jax.random.fold_in(key, int(pool.uid[e])), t)
        _, grad = gcg.loss_and_grad(params, mcfg, batch, cache, jnp.asarray(cur[None]), None)
        cands = np.asarray(gcg.sample_candidates(sub, grad[0], jnp.asarray(cur), self.banned, topk=topk, width=W,
                                                 positions="even"))
        valid = common.retokenizes_in_context(self.tok, [lay], cands[None])[0] if g.filter_ids else np.ones(W, bool)
        rows = np.concatenate([cands, np.zeros((n_pad - W, n), np.int32)]).astype(np.int32)
        ok = np.concatenate([valid, np.zeros(n_pad - W, bool)])
        ls = np.asarray(gcg.candidate_losses(params, mcfg, batch, cache, jnp.zeros(n_pad, jnp.int32), jnp.asarray(rows),
                                             jnp.asarray(ok), chunk=chunk))[:W]
        if np.isfinite(ls).any():
          cur = cands[int(np.argmin(ls))].astype(np.int32)
      suffix[e, :n] = cur
    return dataclasses.replace(pool, suffix=suffix)

  # -- batches ---------------------------------------------------------------------------------------

  def prompt_ids(self, pool: Pool, e: int, with_suffix: bool) -> list[int]:
    """The chat-formatted user turn of entry e: behavior + suffix in the attack's message template, or the
    behavior alone (exactly `core.tokenize`'s prompt ids)."""
    if with_suffix:
      n = int(pool.suffix_len[e])
      return self.layout(int(pool.behavior[e]), int(pool.n_bang[e])).prompt_ids(pool.suffix[e, :n])
    b = int(pool.behavior[e])
    if b not in self._plain:
      self._plain[b] = self.tok.encode(self.tok.format_chat(self.behaviors[b]))
    return self._plain[b]

  def _rows(self, prompts: list[list[int]], completions: list[list[int]]) -> training.Batch:
    exs = [training.Tokenized(np.asarray(p + c, np.int32), len(p)) for p, c in zip(prompts, completions)]
    T = fixed_len(max(len(x.ids) for x in exs), self.r.row_len, self.r.pad_multiple)
    arrays = training.pack_rows([[x] for x in exs], T, self.tok.pad_id)
    return training.Batch(**{k: jnp.asarray(v) for k, v in arrays.items()})

  def step_batch(self, pool: Pool, which: np.ndarray, step: int) -> StepBatch:
    adv = self.adversarial
    prompts = [self.prompt_ids(pool, int(e), adv) for e in which]
    toward = self._rows(prompts, [self.refusal_ids + [self.eot]] * len(prompts))
    away = None
    if adv:
      away = self._rows(prompts, [self.tok.encode(self.targets[int(pool.behavior[e])]) for e in which])
    return StepBatch(self.dataset.batch(step), toward, away)

  # -- the run ---------------------------------------------------------------------------------------

  def one_step(self, state: R2D2State, step_fn: Callable) -> tuple[R2D2State, dict]:
    """Reset (when due), select, attack (R2D2 only), one optimizer step."""
    s = int(state.step)
    pool = self.maybe_reset(state.pool, s)
    which = self.select(s)
    t_gcg = 0.0
    if self.adversarial and self.r.gcg_steps > 0:
      t0 = time.perf_counter()
      pool = self.attack(self._merge(state.train.params, self.model.params), pool, which, s)
      t_gcg = time.perf_counter() - t0
    train, metrics = step_fn(state.train, self.step_batch(pool, which, s))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["gcg_seconds"] = t_gcg
    return R2D2State(train, pool), metrics

  def fingerprint(self) -> str:
    h = hashlib.sha256(self.dataset.fingerprint().encode())
    h.update(json.dumps([self.behaviors, self.targets, self.adversarial]).encode())
    return h.hexdigest()


def ema(prev: float | None, x: float, decay: float) -> float:
  """Exponential moving average (the first value starts it)."""
  return x if prev is None or not np.isfinite(prev) else decay * prev + (1 - decay) * x


def run_loop(trainer: Trainer, state: R2D2State, step_fn: Callable, num_steps: int, *, checkpointer=None,
             metrics_path: str | None = None, log: Callable[[str], None] | None = tqdm.write, log_every: int = 10,
             ema_decay: float = 0.9) -> tuple[R2D2State, list[dict]]:
  """`core.train_loop` for R2D2 states: the state (params and pool) saved at step 0, every
  `checkpointer.save_every` steps and at the end; metrics rows per step with EMA-smoothed losses
  (`<term>_ema`, recomputed from the kept rows on resume, so they match an uninterrupted run)."""
  start = int(state.step)
  rows = []
  if metrics_path and jax.process_index() != 0:
    metrics_path = None
  if metrics_path:
    rows = training.read_metrics(metrics_path, max_step=start)
    training._rewrite(metrics_path, rows)
  if checkpointer is not None and start == 0:
    checkpointer.save(state)
  smooth: dict[str, float | None] = {}
  for r in rows:
    for k in ("loss", "sft", "toward", "away"):
      if k in r:
        smooth[k] = r.get(f"{k}_ema", smooth.get(k))
  f = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
  try:
    for s in range(start, num_steps):
      t0 = time.perf_counter()
      state, m = trainer.one_step(state, step_fn)
      for k in ("loss", "sft", "toward", "away"):
        if k in m:
          smooth[k] = ema(smooth.get(k), m[k], ema_decay)
          m[f"{k}_ema"] = smooth[k]
      row = dict(step=s + 1, **m, seconds=time.perf_counter() - t0)
      rows.append(row)
      if f:
        f.write(json.dumps(row) + "\n")
        f.flush()
      if log and ((s + 1) % log_every == 0 or s == start or s + 1 == num_steps):
        terms = " ".join(f"{k} {m[k + '_ema']:.4f}" for k in ("sft", "toward", "away") if k in m)
        log(f"step {s + 1}/{num_steps} loss(ema) {m['loss_ema']:.4f} {terms} gcg {m['gcg_seconds']:.1f}s "
            f"{row['seconds']:.1f}s")
      if checkpointer is not None:
        checkpointer.save(state, force=s + 1 == num_steps)
  finally:
    if f:
      f.close()
  return state, rows


# --- Setup and restore ------------------------------------------------------------------------------


def abstract_pool(cfg) -> Pool:
  N, S = int(cfg.r2d2.pool_size), int(cfg.r2d2.max_suffix)
  i = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  return Pool(i(N), i(N), i(N), i(N, S), i(N), i())


def abstract_state(model, cfg):
  """The R2D2State a run of `cfg` checkpoints, as ShapeDtypeStructs (no memory)."""
  from lvs_jax.training import recipes

  train = recipes.abstract_state(model, cfg)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  pool = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_pool(cfg))
  return R2D2State(train, pool)


def start(model, trainer: Trainer, cfg, workdir: str, *, log: Callable[[str], None] = print):
  """(state, step_fn, checkpointer): a fresh or resumed run of `cfg` in workdir/checkpoints."""
  from lvs_jax.io import checkpoints
  from lvs_jax.training import recipes

  init, opt, sched, sig = recipes.setup(model, cfg)
  state = R2D2State(training.init_state(init(), opt, cfg.seed), trainer.init_pool())
  expect = dict(data_hash=trainer.fingerprint(), trainable=sig, kind=KIND)
  ck = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=cfg.checkpoint.save_every,
                                keep=cfg.checkpoint.keep or None, metadata=dict(
                                  expect, config=cfg.to_dict(), model=str(cfg.model)))
  restored = ck.restore_latest(checkpoints.abstract_like(state), expect=expect)
  if restored is not None:
    state = restored[0]
    state = R2D2State(state.train, jax.tree.map(np.asarray, state.pool))
    log(f"resuming from step {int(state.step)} of {ck.directory}")
  r = cfg.r2d2
  weights = dict(sft=r.sft_weight, toward=r.toward_weight, away=r.away_weight if cfg.adversarial else 0.0)
  step = make_step(model.cfg, opt, model.params if cfg.mode == "lora" else None, weights=weights,
                   threshold=r.away_threshold, schedule=sched, compute_dtype=jnp.dtype(cfg.compute_dtype),
                   remat=cfg.remat)
  return state, step, ck


def write_pool(path: str, trainer: Trainer, pool: Pool) -> None:
  """The pool as readable test cases (behavior, target, suffix text), JSON."""
  rows = []
  for e in pool.entries():
    b = e["behavior"]
    rows.append(dict(uid=e["uid"], behavior=trainer.behaviors[b], target=trainer.targets[b],
                     suffix=common.decode_many(trainer.tok, [e["suffix"]])[0] if e["suffix"] else ""))
  files.atomic_write_json(path, rows)
