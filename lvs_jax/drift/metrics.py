"""Metrics of binary safety probes and of class separability, in JAX (jit- and vmap-safe).

Axis names: N samples, D embedding dimension, K classes. Binary labels y [N] are 0/1 (1 = the
positive class, e.g. harmful); probabilities p [N] are P(y = 1). The *predicted* class is p > 0.5
and its *confidence* is max(p, 1 - p) in [0.5, 1].

Classification:
  roc_auc                area under the ROC curve, ties counted 1/2 (= scikit-learn's roc_auc_score)
  accuracy               share of correct predictions at threshold 0.5
  balanced_accuracy      mean per-class recall at threshold 0.5 (chance 0.5)
  mean_confidence        mean of max(p, 1 - p)
  silent_failure_rate    share of the *errors* whose confidence exceeds a threshold (default 0.8):
                         failures that a confidence monitor cannot see
  expected_calibration_error   top-label ECE with equal-width confidence bins on [0, 1]
  angle_deg              angle between paired vectors, in degrees

Separability (of embeddings x [N, D] with labels y):
  fisher_ratio           between/within-class variance along the shrinkage-LDA direction
  fisher_trace_ratio     tr(S_between) / tr(S_within)
  silhouette             mean silhouette coefficient (= scikit-learn's silhouette_score)
  linear_margin          a quantile of signed geometric margins under a linear SVM
Scale: fisher ratios and silhouette (cosine) are scale-free; linear_margin and the euclidean
silhouette are in the units of x. `separability` unit-normalizes rows first by default, so two
models' numbers are comparable (margins then are chord distances on the unit sphere, ~ radians).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

# --- Classification --------------------------------------------------------------------------------


@jax.jit
def roc_auc(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """ROC-AUC of `scores` [N] for binary `labels` [N]; ties between classes count 1/2.

  Computed exactly as the Mann-Whitney statistic: for each positive, the number of negatives scored
  below it plus half the number scored equal, counted in int32 and divided once (exact for N up to
  ~46k). nan when a class is absent. Sorting costs O(N log N).
  """
  scores = jnp.asarray(scores, jnp.float32)
  pos = jnp.asarray(labels).astype(bool)
  neg_i = (~pos).astype(jnp.int32)
  order = jnp.argsort(scores)
  s_sorted = scores[order]
  cum_neg = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(neg_i[order])])  # [N + 1]
  below = cum_neg[jnp.searchsorted(s_sorted, scores, side="left")]  # negatives with score < s_i
  at_or_below = cum_neg[jnp.searchsorted(s_sorted, scores, side="right")]  # negatives with score <= s_i
  twice_u = jnp.sum(jnp.where(pos, below + at_or_below, 0))  # 2 * Mann-Whitney U (integer)
  n_pos = jnp.sum(pos.astype(jnp.int32))
  n_neg = jnp.sum(neg_i)
  denom = 2.0 * n_pos.astype(jnp.float32) * n_neg.astype(jnp.float32)
  return jnp.where(denom > 0, twice_u.astype(jnp.float32) / jnp.maximum(denom, 1.0), jnp.nan)


def confidence(probs: jax.Array) -> jax.Array:
  """Confidence of the predicted class, max(p, 1 - p) [N]."""
  return jnp.maximum(probs, 1.0 - probs)


def correct(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Whether the thresholded prediction (p > 0.5) equals the label, bool [N]."""
  return (probs > 0.5) == jnp.asarray(labels).astype(bool)


def accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Share of correct predictions at threshold 0.5."""
  return jnp.mean(correct(probs, labels).astype(jnp.float32))


@jax.jit
def balanced_accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean of the per-class recalls at threshold 0.5 (chance = 0.5 at any class balance)."""
  ok = correct(probs, labels).astype(jnp.float32)
  pos = jnp.asarray(labels).astype(bool)
  w1, w0 = pos.astype(jnp.float32), (~pos).astype(jnp.float32)
  return 0.5 * (jnp.sum(ok * w1) / jnp.maximum(jnp.sum(w1), 1.0) + jnp.sum(ok * w0) / jnp.maximum(jnp.sum(w0), 1.0))


def mean_confidence(probs: jax.Array) -> jax.Array:
  return jnp.mean(confidence(probs))


@jax.jit
def silent_failure_rate(probs: jax.Array, labels: jax.Array, threshold: float = 0.8) -> jax.Array:
  """Share of misclassified samples whose confidence is > `threshold`; nan when there is no error."""
  err = ~correct(probs, labels)
  loud = (confidence(probs) > threshold) & err
  n_err = jnp.sum(err.astype(jnp.float32))
  return jnp.where(n_err > 0, jnp.sum(loud.astype(jnp.float32)) / jnp.maximum(n_err, 1.0), jnp.nan)


@functools.partial(jax.jit, static_argnames=("n_bins",))
def expected_calibration_error(probs: jax.Array, labels: jax.Array, n_bins: int = 15) -> jax.Array:
  """Top-label ECE = sum_b (n_b / N) |acc_b - conf_b| over `n_bins` equal-width bins of the
  confidence on [0, 1] (Guo et al. 2017); binary confidences fill the upper half of the bins."""
  conf = confidence(probs)
  ok = correct(probs, labels).astype(jnp.float32)
  b = jnp.clip(jnp.floor(conf * n_bins).astype(jnp.int32), 0, n_bins - 1)
  gap = jax.ops.segment_sum(ok - conf, b, num_segments=n_bins)
  return jnp.sum(jnp.abs(gap)) / probs.shape[0]


@functools.partial(jax.jit, static_argnames=("n_bins",))
def classification_metrics(probs: jax.Array, labels: jax.Array, silent_threshold: float = 0.8,
                           n_bins: int = 15, scores: jax.Array | None = None) -> dict[str, jax.Array]:
  """All classification metrics of one prediction set, as a dict of scalars (vmappable).

  auc, accuracy, balanced_accuracy, confidence (mean), silent_failure_rate (of errors), silent_share (silent failures
  as a share of all samples), ece, error_confidence (mean confidence of the errors; nan if none).
  scores [N]: what the AUC ranks (e.g. logits, which do not saturate to tied 0s and 1s in float32
  as confident probabilities do); default the probabilities.
  """
  err = ~correct(probs, labels)
  n_err = jnp.sum(err.astype(jnp.float32))
  conf = confidence(probs)
  return dict(
    auc=roc_auc(probs if scores is None else scores, labels),
    accuracy=accuracy(probs, labels),
    balanced_accuracy=balanced_accuracy(probs, labels),
    confidence=jnp.mean(conf),
    silent_failure_rate=silent_failure_rate(probs, labels, silent_threshold),
    silent_share=jnp.mean(((conf > silent_threshold) & err).astype(jnp.float32)),
    ece=expected_calibration_error(probs, labels, n_bins),
    error_confidence=jnp.where(n_err > 0, jnp.sum(jnp.where(err, conf, 0.0)) / jnp.maximum(n_err, 1.0), jnp.nan),
  )


@jax.jit
def angle_deg(x: jax.Array, y: jax.Array) -> jax.Array:
  """Angle between rows of x and y [..., D] -> [...], in degrees.

  2 atan2(||u - v||, ||u + v||) of the unit vectors u, v (Kahan): accurate at every angle and exactly
  0 for parallel rows, where arccos of the cosine is not (float32 arccos cannot resolve angles below
  ~0.03 degrees).
  """
  u = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  v = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
  return jnp.degrees(2.0 * jnp.arctan2(jnp.linalg.norm(u - v, axis=-1), jnp.linalg.norm(u + v, axis=-1)))


# --- Separability ----------------------------------------------------------------------------------


def _class_stats(x: jax.Array, y: jax.Array):
  pos = jnp.asarray(y).astype(bool)
  w1 = pos.astype(x.dtype)
  w0 = 1.0 - w1
  mu1 = (w1 @ x) / jnp.sum(w1)
  mu0 = (w0 @ x) / jnp.sum(w0)
  centered = x - jnp.where(pos[:, None], mu1, mu0)
  s_w = centered.T @ centered / x.shape[0]  # pooled within-class covariance [D, D]
  return mu0, mu1, s_w, jnp.mean(w1)


@jax.jit
def fisher_ratio(x: jax.Array, y: jax.Array, shrinkage: float = 0.1) -> jax.Array:
  """Fisher criterion (w . dmu)^2 / (w^T S_w w) along w = (S_w + g tr(S_w)/D I)^-1 dmu.

  x [N, D], y [N] binary; dmu = mu_1 - mu_0, S_w the pooled within-class covariance, g =
  `shrinkage` (needed when D >= N). In-sample: the squared distance between the class means along
  the discriminant, in units of the within-class standard deviation along it (d'^2).
  """
  mu0, mu1, s_w, _ = _class_stats(x, y)
  d = x.shape[1]
  dmu = mu1 - mu0
  reg = s_w + shrinkage * jnp.trace(s_w) / d * jnp.eye(d, dtype=x.dtype)
  w = jnp.linalg.solve(reg, dmu)
  return (w @ dmu) ** 2 / (w @ s_w @ w)


@jax.jit
def fisher_trace_ratio(x: jax.Array, y: jax.Array) -> jax.Array:
  """tr(S_between) / tr(S_within) = p(1-p) ||mu_1 - mu_0||^2 / tr(S_w) (binary, p = share of positives)."""
  mu0, mu1, s_w, p = _class_stats(x, y)
  return p * (1 - p) * jnp.sum((mu1 - mu0) ** 2) / jnp.trace(s_w)


@functools.partial(jax.jit, static_argnames=("metric", "num_classes"))
def silhouette(x: jax.Array, y: jax.Array, metric: str = "euclidean", num_classes: int = 2) -> jax.Array:
  """Mean silhouette coefficient (b - a) / max(a, b) over samples; a sample alone in its class
  scores 0 (as scikit-learn). metric: "euclidean" or "cosine" (1 - cos). y [N] ints in [0, K)."""
  x = jnp.asarray(x, jnp.float32)
  if metric == "cosine":
    u = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    dist = jnp.clip(1.0 - u @ u.T, 0.0, 2.0)
  elif metric == "euclidean":
    sq = jnp.sum(x * x, 1)
    dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
  else:
    raise ValueError(f"unknown metric {metric!r}; expected 'euclidean' or 'cosine'")
  dist = dist * (1.0 - jnp.eye(x.shape[0], dtype=dist.dtype))
  onehot = jax.nn.one_hot(jnp.asarray(y), num_classes, dtype=dist.dtype)  # [N, K]
  sums = dist @ onehot  # [N, K] summed distance to each class
  counts = jnp.sum(onehot, 0)  # [K]
  own = jnp.sum(onehot * sums, 1)
  n_own = onehot @ counts
  a = own / jnp.maximum(n_own - 1.0, 1.0)
  other = jnp.where((onehot > 0) | (counts[None] == 0), jnp.inf, sums / jnp.maximum(counts[None], 1.0))
  b = jnp.min(other, 1)
  s = jnp.where(n_own > 1, (b - a) / jnp.maximum(jnp.maximum(a, b), 1e-30), 0.0)
  return jnp.mean(s)


@functools.partial(jax.jit, static_argnames=("steps",))
def linear_margin(x: jax.Array, y: jax.Array, quantile: float = 0.05, l2: float = 1e-4, steps: int = 500,
                  lr: float = 0.05) -> tuple[jax.Array, jax.Array]:
  """(margin, train accuracy) of a linear SVM fitted to x [N, D], y [N] binary.

  The SVM: mean squared hinge max(0, 1 - s_i (w . z_i + b))^2 + l2 ||w||^2 with s_i = +-1 and z the
  rows of x centered and scaled to unit RMS norm, minimized by Adam for `steps` full-batch steps.
  margin = the `quantile` quantile of the signed geometric margins s_i (w . x_i + b') / ||w|| in the
  units of x (the minimum at quantile 0; negative when more than that share is misclassified).
  """
  x = jnp.asarray(x, jnp.float32)
  s = jnp.where(jnp.asarray(y).astype(bool), 1.0, -1.0)
  mu = jnp.mean(x, 0)
  scale = jnp.sqrt(jnp.mean(jnp.sum((x - mu) ** 2, 1)))
  z = (x - mu) / scale

  def loss(p):
    w, b = p
    return jnp.mean(jnp.maximum(0.0, 1.0 - s * (z @ w + b)) ** 2) + l2 * jnp.sum(w * w)

  opt = optax.adam(lr)
  p0 = (jnp.zeros(x.shape[1], jnp.float32), jnp.zeros((), jnp.float32))

  def step(carry, _):
    p, st = carry
    g = jax.grad(loss)(p)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes float and int32 step counts
      upd, st = opt.update(g, st, p)
    return (optax.apply_updates(p, upd), st), None

  ((w, b), _), _ = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
  margins = s * (z @ w + b) * scale / jnp.maximum(jnp.linalg.norm(w), 1e-30)
  return jnp.quantile(margins, quantile), jnp.mean((margins > 0).astype(jnp.float32))


def separability(x: jax.Array, y: jax.Array, normalize: bool = True, shrinkage: float = 0.1) -> dict[str, float]:
  """Every separability metric of embeddings x [N, D] with binary labels y [N] -> {name: float}.

  normalize: unit-normalize rows first (the drift kit's convention; makes models comparable).
  """
  x = jnp.asarray(x, jnp.float32)
  if normalize:
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  y = jnp.asarray(y).astype(jnp.int32)
  margin, svm_acc = linear_margin(x, y)
  return dict(
    fisher_ratio=float(fisher_ratio(x, y, shrinkage)),
    fisher_trace_ratio=float(fisher_trace_ratio(x, y)),
    silhouette_cosine=float(silhouette(x, y, "cosine")),
    silhouette_euclidean=float(silhouette(x, y, "euclidean")),
    linear_margin=float(margin),
    svm_train_accuracy=float(svm_acc),
  )


def compare_separability(x_a: jax.Array, y_a: jax.Array, x_b: jax.Array, y_b: jax.Array,
                         names: tuple[str, str] = ("a", "b"), normalize: bool = True) -> list[dict]:
  """Separability of two models' embeddings side by side (e.g. base vs instruct).

  x_a [N_a, D_a], x_b [N_b, D_b] (dimensions may differ; use the same prompts for a fair
  comparison). Returns one row per metric: {"metric", names[0], names[1], "relative_change"} with
  relative_change = (b - a) / |a| (negative: b separates the classes worse).
  """
  sa, sb = separability(x_a, y_a, normalize), separability(x_b, y_b, normalize)
  rows = []
  for k in sa:
    a, b = sa[k], sb[k]
    rows.append({"metric": k, names[0]: a, names[1]: b, "relative_change": (b - a) / abs(a) if a else float("nan")})
  return rows
