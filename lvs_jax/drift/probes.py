"""Safety probes on frozen embeddings: logistic regression and a small MLP, trained in JAX with optax.

A probe maps embeddings x [N, D] to P(y = 1 | x) (1 = the positive class, e.g. harmful). Pipeline,
all inside the `Probe` pytree so it travels with the weights:

  x -> unit-normalize rows (normalize=True) -> standardize with the training mean/std per feature
    (standardize=True) -> logit f(z) (logreg: w.z + b; mlp: w2.gelu(W1 z + b1) + b2)
    -> calibrated probability sigmoid(f(z) / T)

Training (`fit`): full-batch Adam on the class-weighted binary cross-entropy plus l2 ||W||^2 (all
weight matrices; not biases), for at most `max_steps` steps, with early stopping on the validation
loss: the parameters of the best validation step are kept, and updates stop after `patience`
steps without improvement. class_weight="balanced" weighs class c by N / (2 N_c). Calibration:
temperature scaling (Guo et al. 2017): T minimizes the validation NLL of sigmoid(f / T) over a
log-spaced grid, T in [e^-5, e^5], against Platt's smoothed targets (`fit_temperature`).

`fit` is a pure function of arrays (the config is static), so it vmaps over l2 values
(`fit_select`), over layers (`val_auc_per_layer`) and over seeds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from lvs_jax.drift import metrics
from lvs_jax.evals import stats

KINDS = ("logreg", "mlp")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Static probe settings (hashable: a jit static argument).

  kind: "logreg" | "mlp". hidden: MLP width. lr: Adam learning rate. max_steps, patience: early
  stopping (steps of full-batch training; patience <= 0 trains max_steps and keeps the last step).
  class_weight: "balanced" | "none". normalize, standardize: input preprocessing (module
  docstring). calibrate: fit the temperature on the validation split (else T = 1).
  """

  kind: str = "logreg"
  hidden: int = 64
  lr: float = 1e-2
  max_steps: int = 400
  patience: int = 40
  class_weight: str = "balanced"
  normalize: bool = True
  standardize: bool = True
  calibrate: bool = True


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Probe:
  """A trained probe. params: {"w": [D] , "b": []} (logreg) or {"w1": [D, H], "b1": [H], "w2": [H],
  "b2": []} (mlp). mean, std [D]: standardization. temperature: []. kind: static."""

  params: dict
  mean: jax.Array
  std: jax.Array
  temperature: jax.Array
  kind: str = dataclasses.field(default="logreg", metadata=dict(static=True))
  normalize: bool = dataclasses.field(default=True, metadata=dict(static=True))


def _prep(x, mean, std, normalize: bool):
  x = jnp.asarray(x, jnp.float32)
  if normalize:
    x = stats.unit(x)
  return (x - mean) / std


def _raw_logits(params: dict, z: jax.Array, kind: str) -> jax.Array:
  if kind == "logreg":
    return z @ params["w"] + params["b"]
  h = jax.nn.gelu(z @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def logits(probe: Probe, x: jax.Array) -> jax.Array:
  """Calibrated logits f(z) / T [N] of embeddings x [N, D]."""
  z = _prep(x, probe.mean, probe.std, probe.normalize)
  return _raw_logits(probe.params, z, probe.kind) / probe.temperature


def predict_proba(probe: Probe, x: jax.Array) -> jax.Array:
  """Calibrated P(y = 1 | x) [N] for embeddings x [N, D]."""
  return jax.nn.sigmoid(logits(probe, x))


def _init(key, d: int, cfg: ProbeConfig) -> dict:
  if cfg.kind == "logreg":
    return {"w": jnp.zeros(d, jnp.float32), "b": jnp.zeros((), jnp.float32)}
  if cfg.kind == "mlp":
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (d, cfg.hidden), jnp.float32) / jnp.sqrt(d),
            "b1": jnp.zeros(cfg.hidden, jnp.float32),
            "w2": jax.random.normal(k2, (cfg.hidden,), jnp.float32) / jnp.sqrt(cfg.hidden),
            "b2": jnp.zeros((), jnp.float32)}
  raise ValueError(f"unknown probe kind {cfg.kind!r}; expected one of {KINDS}")


def _weights(y, cfg: ProbeConfig):
  y = y.astype(jnp.float32)
  if cfg.class_weight == "none":
    return jnp.ones_like(y)
  if cfg.class_weight != "balanced":
    raise ValueError(f"unknown class_weight {cfg.class_weight!r}; expected 'balanced' or 'none'")
  n, n1 = y.shape[0], jnp.sum(y)
  return jnp.where(y > 0, n / (2.0 * jnp.maximum(n1, 1.0)), n / (2.0 * jnp.maximum(n - n1, 1.0)))


def _bce(f, y, w):
  return jnp.sum(w * optax.sigmoid_binary_cross_entropy(f, y.astype(jnp.float32))) / jnp.sum(w)


def fit_temperature(val_logits: jax.Array, y_val: jax.Array, smooth: bool = True) -> jax.Array:
  """Temperature T [] minimizing the NLL of sigmoid(f / T) on validation logits f [N].

  smooth: Platt's (1999) targets (N_+ + 1) / (N_+ + 2) for positives and 1 / (N_- + 2) for
  negatives instead of 1 and 0. Without them a separable validation set (common for harmful vs
  harmless) drives T to 0 and every probability to exactly 0 or 1; with them the confidence a
  validation set of that size can support is the ceiling.
  """
  y = y_val.astype(jnp.float32)
  if smooth:
    n1 = jnp.sum(y)
    n0 = y.shape[0] - n1
    y = jnp.where(y > 0, (n1 + 1.0) / (n1 + 2.0), 1.0 / (n0 + 2.0))
  grid = jnp.exp(jnp.linspace(-5.0, 5.0, 401))
  nll = jax.vmap(lambda t: jnp.mean(optax.sigmoid_binary_cross_entropy(val_logits / t, y)))
  return grid[jnp.argmin(nll(grid))]


@functools.partial(jax.jit, static_argnames=("cfg",))
def fit(key: jax.Array, x_train: jax.Array, y_train: jax.Array, x_val: jax.Array, y_val: jax.Array,
        cfg: ProbeConfig = ProbeConfig(), l2: float = 1e-3) -> tuple[Probe, dict]:
  """Trains a probe -> (Probe, info).

  x_train [N, D], y_train [N] (0/1), x_val [M, D], y_val [M]: the validation split drives early
  stopping and the temperature. l2: the penalty weight (traced, so it vmaps). info: best_step,
  val_loss (class-weighted BCE at the best step, before calibration), val_auc, temperature.
  """
  mean, std = jnp.zeros(x_train.shape[1], jnp.float32), jnp.ones(x_train.shape[1], jnp.float32)
  z0 = _prep(x_train, mean, std, cfg.normalize)
  if cfg.standardize:
    mean, std = jnp.mean(z0, 0), jnp.std(z0, 0) + 1e-6
  z_tr = _prep(x_train, mean, std, cfg.normalize)
  z_va = _prep(x_val, mean, std, cfg.normalize)
  w_tr, w_va = _weights(y_train, cfg), _weights(y_val, cfg)

  def penalty(p):
    return sum(jnp.sum(v * v) for k, v in p.items() if k.startswith("w"))

  def train_loss(p):
    return _bce(_raw_logits(p, z_tr, cfg.kind), y_train, w_tr) + l2 * penalty(p)

  def val_loss(p):
    return _bce(_raw_logits(p, z_va, cfg.kind), y_val, w_va)

  opt = optax.adam(cfg.lr)
  p0 = _init(key, x_train.shape[1], cfg)

  def step(carry, i):
    p, st, best_p, best_loss, best_step, stopped = carry
    g = jax.grad(train_loss)(p)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes float and int32 step counts
      upd, st_new = opt.update(g, st, p)
    p_new = optax.apply_updates(p, upd)
    p_new, st_new = jax.tree.map(lambda a, b: jnp.where(stopped, a, b), (p, st), (p_new, st_new))
    vl = val_loss(p_new)
    better = (vl < best_loss) & ~stopped
    best_p = jax.tree.map(lambda a, b: jnp.where(better, b, a), best_p, p_new)
    best_step = jnp.where(better, i + 1, best_step)
    best_loss = jnp.where(better, vl, best_loss)
    stopped = stopped | ((i + 1 - best_step >= cfg.patience) & (cfg.patience > 0))
    return (p_new, st_new, best_p, best_loss, best_step, stopped), None

  init = (p0, opt.init(p0), p0, val_loss(p0), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  (last_p, _, best_p, best_loss, best_step, _), _ = jax.lax.scan(step, init, jnp.arange(cfg.max_steps))
  if cfg.patience <= 0:  # no early stopping: the last step
    best_p, best_loss, best_step = last_p, val_loss(last_p), jnp.asarray(cfg.max_steps, jnp.int32)
  f_va = _raw_logits(best_p, z_va, cfg.kind)
  t = fit_temperature(f_va, y_val) if cfg.calibrate else jnp.ones((), jnp.float32)
  probe = Probe(best_p, mean, std, t, cfg.kind, cfg.normalize)
  info = dict(best_step=best_step, val_loss=best_loss, val_auc=metrics.roc_auc(f_va, y_val), temperature=t)
  return probe, info


def fit_select(key: jax.Array, x_train, y_train, x_val, y_val, cfg: ProbeConfig = ProbeConfig(),
               l2s=(1e-4, 1e-3, 1e-2, 1e-1)) -> tuple[Probe, dict]:
  """`fit` for every l2 in `l2s` (one vmap), keeping the one with the lowest validation loss.

  info gains "l2" (the chosen value) and "val_loss_per_l2" [len(l2s)].
  """
  l2s = jnp.asarray(l2s, jnp.float32)
  probes, infos = jax.vmap(fit, (None, None, None, None, None, None, 0))(key, x_train, y_train, x_val, y_val, cfg,
                                                                         l2s)
  i = int(jnp.argmin(infos["val_loss"]))
  best = jax.tree.map(lambda a: a[i], probes)
  info = {k: v[i] for k, v in infos.items()}
  info.update(l2=float(l2s[i]), val_loss_per_l2=infos["val_loss"])
  return best, info


@functools.partial(jax.jit, static_argnames=("cfg",))
def val_auc_per_layer(key: jax.Array, x_train: jax.Array, y_train: jax.Array, x_val: jax.Array, y_val: jax.Array,
                      cfg: ProbeConfig = ProbeConfig(), l2: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """(validation ROC-AUC [L], validation loss [L]) of a probe fitted at each layer; x_train [L, N, D],
  x_val [L, M, D]. The loss (class-weighted BCE at the best step) breaks ties between AUCs of 1."""
  def one(xt, xv):
    probe, info = fit(key, xt, y_train, xv, y_val, cfg, l2)
    return metrics.roc_auc(logits(probe, xv), y_val), info["val_loss"]

  return jax.lax.map(lambda a: one(*a), (x_train, x_val))


def augment_isotropic(key: jax.Array, x: jax.Array, y: jax.Array, sigma: float, copies: int = 4,
                      convention: str = "norm") -> tuple[jax.Array, jax.Array]:
  """Drift-aware training data: x [N, D] plus `copies` isotropically drifted copies at `sigma`
  (`drift.isotropic`) -> (x' [(copies + 1) N, D], y' [(copies + 1) N])."""
  from lvs_jax.drift import families as drift

  keys = jax.random.split(key, copies)
  noisy = jax.vmap(lambda k: drift.isotropic(k, x, sigma, convention))(keys)
  return jnp.concatenate([x[None], noisy]).reshape(-1, x.shape[-1]), jnp.tile(y, copies + 1)
