"""Training under residual-stream perturbations: latent adversarial training (LAT) and latent dissociation.

LAT (Casper et al. 2024, "Defending Against Unforeseen Failure Modes with Latent Adversarial Training";
Sheshadri et al. 2024, "Targeted Latent Adversarial Training", aengusl/latent-adversarial-training):
each step an inner adversary perturbs the residual stream at several layers, at the prompt tokens, to
elicit a harmful completion; the outer step trains the model (LoRA) to refuse *under that perturbation*,
plus a benign SFT term on clean inputs:

  adversary   delta = argmin  adv_target * CE(prompt + delta -> harmful target)
                            + adv_away  * away(prompt + delta -> refusal)          (away = -log(1 - p))
              by projected gradient descent: `steps` steps of size step_size * eps (the gradient
              normalized per token), each followed by the exact projection onto the ball
                  ||delta_{l,t}||_2 <= eps * ||h_{l,t}||_2      at every attacked layer l, prompt token t
              (norm-relative, per token: the LVS threat model of `lvs_jax.lvs.attack`, norm="l2",
              scope="token", whose projection and step direction are reused here). The perturbation
              is an `add_rel` edit (`lvs_jax.core.edit`), so the radius is relative to the activation
              entering the layer (at a deeper attacked layer that activation already carries the
              shallower layers' perturbation).
  defender    w_sft * CE(benign) + w_toward * CE(prompt + delta -> refusal) + w_away * away(prompt + delta
              -> harmful target), delta held fixed (`r2d2.make_step` with `perturb`: the same outer step
              as R2D2 and its SFT twin; with eps = 0 it is exactly that step without an attack).

Latent dissociation (the LVS paper's constructed "dissociated" models) uses the same machinery with
the roles of the rows swapped: the clean batch teaches refusal of harmful prompts (and benign
helpfulness), the perturbed rows teach the harmful target under a small perturbation at middle layers,
either `mode="random"` (a random direction per token, a radius ~ U[min_frac * eps, eps] per prompt) or
`mode="direction"` (one fixed seeded unit direction per layer, the same at every prompt token, at such a
radius: a latent trigger). The aim is a model that refuses clean harmful prompts like the anchor while
complying under small latent perturbations: outward safety, latent fragility, by construction. (Measured
on SmolLM2: with random directions of radius <= 0.05 the compliance generalized to clean prompts, so
the model refused nothing; README.)

Rows: `LatData` pairs each harmful prompt's two rows (defender-toward and defender-away completions)
row for row, the prompt at slots [0, n_prompt) of both, so one delta [K, T, D] serves both. Batches are
a pure function of (seed, step) (`core.Dataset`), and the perturbation's randomness comes from the
state's rng (`r2d2.make_step`): a resumed run is bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import edit as edit_lib
from lvs_jax.core.config import ModelConfig
from lvs_jax.lvs import attack as attack_lib
from lvs_jax.training import core as training
from lvs_jax.training import r2d2

MODES = ("pgd", "random", "direction")
_BALL = attack_lib.AttackConfig(norm="l2", scope="token", relative=True)


@dataclasses.dataclass(frozen=True)
class LatentAttack:
  """Static settings of the inner perturbation (hashable).

  layers: attacked layers (resid_pre); eps: per-token radius relative to ||h|| (0 = no perturbation);
  mode: "pgd" (adversary), "random" (a random point of the ball) or "direction" (a fixed seeded direction per
  layer at a random radius), the last two for latent dissociation; min_frac: their radius ~ U[min_frac eps, eps];
  steps, step_size: PGD steps and their size as a fraction of eps; adv_target, adv_away: the adversary's
  weights on CE of the defender's away rows and on away(.) of the defender's toward rows; random_start:
  PGD from a random point of the ball (else from 0); remat: recompute blocks in the adversary's backward.
  """

  layers: tuple[int, ...]
  eps: float
  mode: str = "pgd"
  steps: int = 16
  step_size: float = 0.25
  adv_target: float = 0.5
  adv_away: float = 0.5
  random_start: bool = False
  min_frac: float = 0.0
  direction_seed: int = 0
  threshold: float = -5.0
  remat: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"latent attack mode must be one of {MODES}, got {self.mode!r}")
    if not self.layers or self.eps < 0 or self.steps < 0:
      raise ValueError(f"latent attack needs layers, eps >= 0 and steps >= 0 (got {self.layers}, {self.eps}, "
                       f"{self.steps})")


def prompt_mask(batch: training.Batch) -> jax.Array:
  """[b, T] float32, 1 at the prompt tokens of each (one-example) row: real tokens up to and including the
  last prompt token (the position whose target is the first completion token)."""
  m = batch.loss_mask.astype(jnp.float32)
  before = jnp.cumsum(m, axis=-1) - m
  return ((batch.segment_ids > 0) & (before == 0)).astype(jnp.float32)


def perturbation_edit(u: jax.Array, layers: Sequence[int], n_layers: int) -> edit_lib.Edit:
  """u [nl, b, T, D] (relative units) -> an Edit adding u[i] * ||h|| at resid_pre of layers[i]."""
  full = jnp.zeros((n_layers, *u.shape[1:]), u.dtype).at[jnp.asarray(layers)].set(u)
  return {"resid_pre": edit_lib.SiteEdit(add_rel=full)}


def random_in_ball(key: jax.Array, shape: Sequence[int], eps, where: jax.Array, min_frac: float = 0.0,
                   direction: jax.Array | None = None) -> jax.Array:
  """u [nl, b, T, D]: a random direction per token (or `direction` [nl, D], unit rows, at every token), one
  radius ~ U[min_frac * eps, eps] per (layer, row), 0 off `where`."""
  k1, k2 = jax.random.split(key)
  if direction is None:
    u = jax.random.normal(k1, shape)
  else:
    u = jnp.broadcast_to(direction[:, None, None, :], shape)
  u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-30)
  r = jax.random.uniform(k2, (*shape[:2], 1, 1), minval=min_frac, maxval=1.0) * eps
  return u * r * where[..., None]


def trigger_directions(atk: LatentAttack, d_model: int) -> jax.Array:
  """The fixed unit directions [nl, D] of mode "direction" (seeded by atk.direction_seed)."""
  v = jax.random.normal(jax.random.key(atk.direction_seed), (len(atk.layers), d_model))
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def adversary_loss(u, trainable, base, data: r2d2.StepBatch, cfg: ModelConfig, atk: LatentAttack, compute_dtype):
  """(the adversary's objective, (CE of the defender's away rows, away(.) of its toward rows)) under u."""
  e = perturbation_edit(u, atk.layers, cfg.n_layers)
  s, (n, _) = training.loss_sums(trainable, base, data.away, cfg, compute_dtype=compute_dtype, remat=atk.remat, edit=e)
  a, m = r2d2.away_sums(trainable, base, data.toward, cfg, threshold=atk.threshold, compute_dtype=compute_dtype,
                        remat=atk.remat, edit=e)
  ce, aw = s / jnp.maximum(n, 1.0), a / jnp.maximum(m, 1.0)
  return atk.adv_target * ce + atk.adv_away * aw, (ce, aw)


def latent_attack(trainable, base, data: r2d2.StepBatch, key: jax.Array, *, cfg: ModelConfig, atk: LatentAttack,
                  compute_dtype=jnp.float32) -> tuple[edit_lib.Edit, dict]:
  """The inner perturbation against the current parameters -> (edit, metrics).

  metrics: adv_loss, adv_ce, adv_away (mode "pgd": the adversary's objective and its terms at the
  returned delta; modes "random"/"direction": under the drawn delta), adv_norm (max over tokens of ||u_t|| / eps,
  <= 1 by the projection).
  """
  where = prompt_mask(data.toward)
  shape = (len(atk.layers), *data.toward.tokens.shape, cfg.d_model)
  eps = jnp.asarray(atk.eps, jnp.float32)
  loss = functools.partial(adversary_loss, trainable=trainable, base=base, data=data, cfg=cfg, atk=atk,
                           compute_dtype=compute_dtype)
  if atk.mode in ("random", "direction"):
    v = trigger_directions(atk, cfg.d_model) if atk.mode == "direction" else None
    u = random_in_ball(key, shape, eps, where, atk.min_frac, v)
  else:
    u = random_in_ball(key, shape, eps, where) if atk.random_start else jnp.zeros(shape, jnp.float32)
    grad = jax.grad(lambda x: loss(x)[0])

    def body(_, u):
      g = grad(u)
      return attack_lib.project(u - atk.step_size * eps * attack_lib._ascent_direction(g, _BALL), eps, where, _BALL)

    u = jax.lax.fori_loop(0, atk.steps, body, u)
  total, (ce, aw) = loss(u)
  norm = jnp.max(jnp.linalg.norm(u, axis=-1)) / jnp.maximum(eps, 1e-30)
  return perturbation_edit(u, atk.layers, cfg.n_layers), dict(loss=total, ce=ce, away=aw, norm=norm)


def make_step(cfg: ModelConfig, optimizer, base, *, atk: LatentAttack, weights: dict[str, float], schedule=None,
              compute_dtype=jnp.float32, remat: bool = True):
  """The LAT / dissociation train step: `r2d2.make_step` (benign SFT + toward + away) with the toward and
  away terms under `latent_attack`'s perturbation."""
  perturb = functools.partial(latent_attack, cfg=cfg, atk=atk, compute_dtype=compute_dtype)
  return r2d2.make_step(cfg, optimizer, base, weights=weights, threshold=atk.threshold, schedule=schedule,
                        compute_dtype=compute_dtype, remat=remat, perturb=perturb)


# --- Data -------------------------------------------------------------------------------------------


def paired_rows(tokenizer, prompts: Sequence[str], toward: Sequence[str], away: Sequence[str], *, seq_len: int,
                toward_end_turn: bool, away_end_turn: bool) -> tuple[list[training.Tokenized], ...]:
  """Tokenized (prompt + toward completion) and (prompt + away completion) rows, pair i sharing prompt i."""
  if not (len(prompts) == len(toward) == len(away)) or not prompts:
    raise ValueError(f"need one toward and one away completion per prompt, got {len(prompts)} prompts, "
                     f"{len(toward)} toward, {len(away)} away")
  tw, _ = training.tokenize(tokenizer, [training.Example(p, c, toward_end_turn) for p, c in zip(prompts, toward)],
                            seq_len)
  aw, _ = training.tokenize(tokenizer, [training.Example(p, c, away_end_turn) for p, c in zip(prompts, away)], seq_len)
  return tw, aw


class LatData:
  """One step's data (`r2d2.StepBatch`) as a pure function of (seed, step).

  clean: benign (and, for dissociation, clean-refusal) examples, packed, [k, b, T]; toward / away: K
  harmful prompts with the defender's toward and away completions, one example per row, [K, row_len],
  the same prompts in the same rows (two `core.Dataset`s with the same seed and size visit the same
  order), so the perturbation of row i applies to the same prompt tokens in both.
  """

  def __init__(self, clean: Sequence[training.Tokenized], toward: Sequence[training.Tokenized],
               away: Sequence[training.Tokenized], *, batch_size: int, seq_len: int, micro_batches: int, packing: bool,
               rows_per_step: int, row_len: int, pad_id: int, seed: int):
    if len(toward) != len(away):
      raise ValueError(f"toward and away rows must pair up, got {len(toward)} and {len(away)}")
    for i, (t, a) in enumerate(zip(toward, away)):
      if t.n_prompt != a.n_prompt or not np.array_equal(t.ids[:t.n_prompt], a.ids[:a.n_prompt]):
        raise ValueError(f"row pair {i}: the toward and away rows have different prompts")
    self.clean = training.Dataset(clean, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, seed=seed,
                                  micro_batches=micro_batches, packing=packing)
    kw = dict(batch_size=rows_per_step, seq_len=row_len, pad_id=pad_id, seed=seed + 1)
    self.toward = training.Dataset(toward, **kw)
    self.away = training.Dataset(away, **kw)

  def batch(self, step: int) -> r2d2.StepBatch:
    one = lambda b: jax.tree.map(lambda x: x[0], b)  # noqa: E731  (k = 1 micro-batch)
    return r2d2.StepBatch(self.clean.batch(step), one(self.toward.batch(step)), one(self.away.batch(step)))

  def steps_per_epoch(self) -> float:
    return self.clean.steps_per_epoch()

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for d in (self.clean, self.toward, self.away):
      h.update(d.fingerprint().encode())
    return h.hexdigest()
