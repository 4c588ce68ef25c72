"""Embedding drift: families of perturbations of frozen embeddings, real-drift sources, re-anchoring.

Paper: "I Can't Believe It's Not Robust: Catastrophic Collapse of Safety Classifiers under Embedding
Drift". A safety probe trained on frozen embeddings x [N, D] of model A is evaluated on drifted
embeddings x' of the same prompts. Every synthetic family below *rotates* each vector and keeps its
norm (||x'_i|| = ||x_i||), so its magnitude is an angle; `metrics.angle_deg` measures it. With
u = x / ||x|| the unit embedding, the families and how the magnitude sigma maps to that angle:

1. isotropic (the paper's sigma):   x' = ||x|| normalize(u + s eps),   eps ~ N(0, I_D) per sample.
   The per-sample angle is theta = atan2(s ||eps_perp||, 1 + s eps_par), with ||eps_perp||^2 ~
   chi^2_{D-1} and eps_par ~ N(0, 1); it concentrates (relative spread ~ 1/sqrt(2D)) at
       theta ~ atan(s sqrt(D - 1)).
   Two conventions for s:
     convention="norm" (default):  s = sigma / sqrt(D): the noise vector has expected squared norm
       sigma^2 (norm sigma relative to ||u|| = 1), so theta ~ atan(sigma sqrt((D-1)/D)) ~ atan(sigma):
       sigma = 0.02 -> 1.15 degrees, for any D. This is the convention under which the paper's
       "sigma = 0.02 ~ 1 degree of angular drift" holds, and the one used throughout.
     convention="coord":  s = sigma: sigma is the per-coordinate standard deviation (the literal
       formula normalize(x/||x|| + sigma eps)); theta ~ atan(sigma sqrt(D - 1)): sigma = 0.02 ->
       25.6 degrees at D = 576. coord-sigma = norm-sigma / sqrt(D).
2. directional:  x' = ||x|| normalize(u + sigma v) with one fixed unit direction v for all samples:
   a translation of norm sigma on the unit scale. theta = atan2(sigma sin(a), 1 + sigma cos(a)) with
   a the angle between u and v; = atan(sigma) when v is orthogonal to u (a random v in high D nearly
   is). Models a shift of the whole representation along one direction.
3. subspace:  x' = R x with R a rotation by theta = atan(sigma) in each of floor(k/2) orthogonal
   planes spanning a k-dimensional subspace with orthonormal basis Q [D, k] (for odd k one axis of
   it is fixed); identity on the complement. A vector inside the subspace turns by exactly theta; a
   vector whose projection on the subspace has norm share c = ||Q^T u|| turns by phi with
       cos(phi) = 1 - c^2 (1 - cos(theta)).
   Models a model update that reorganizes a few directions and leaves the rest.
4. real drift: embeddings of the same prompts from two models (`x_a`, `x_b` [N, D]), e.g. two
   checkpoints of one fine-tuning run, or model A and a copy with weights perturbed by a known
   relative amount (`perturb_weights`). The probe trained on A is evaluated on B; the angle is
   `metrics.angle_deg(x_a, x_b)` and the equivalent sigma is tan(angle) (the norm convention).

On the same sigma, families 1 (norm), 2 and 3 (in-subspace vectors) all turn vectors by ~atan(sigma):
they differ in *which* directions the drift takes, not in its size.

Re-anchoring (the fix): `fit_procrustes` learns an orthogonal map from model B's embedding space
back into model A's from a few anchor prompts embedded by both; `apply_alignment` maps new B
embeddings into the probe's space.

Everything here is a pure function of arrays (jax only): keyed, jittable, and vmappable over sigma
and keys (a sweep is `jax.vmap(apply_drift, (None, 0, None, 0))`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lvs_jax.evals.stats import unit

FAMILIES = ("isotropic", "directional", "subspace")
CONVENTIONS = ("norm", "coord")


def noise_scale(sigma, d: int, convention: str = "norm"):
  """The per-coordinate noise std s of the isotropic family for `sigma` (see the module docstring)."""
  if convention == "norm":
    return sigma / math.sqrt(d)
  if convention == "coord":
    return sigma
  raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")


def expected_angle_deg(sigma, d: int, family: str = "isotropic", convention: str = "norm"):
  """The angle (degrees) a family turns a vector by at `sigma` (float or array).

  isotropic: the concentration value atan(s sqrt(D - 1)); directional: atan(sigma) for a vector
  orthogonal to the direction; subspace: atan(sigma) for a vector inside the subspace.
  """
  if family == "isotropic":
    return jnp.degrees(jnp.arctan(noise_scale(jnp.asarray(sigma, jnp.float32), d, convention) * math.sqrt(d - 1)))
  if family in ("directional", "subspace"):
    return jnp.degrees(jnp.arctan(jnp.asarray(sigma, jnp.float32)))
  raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def sigma_for_angle(angle_deg, d: int, family: str = "isotropic", convention: str = "norm"):
  """Inverse of `expected_angle_deg`: the sigma that turns vectors by `angle_deg` degrees."""
  t = jnp.tan(jnp.radians(jnp.asarray(angle_deg, jnp.float32)))
  if family == "isotropic":
    return t / math.sqrt(d - 1) / noise_scale(1.0, d, convention)
  return t


# --- The families ----------------------------------------------------------------------------------


def isotropic(key: jax.Array, x: jax.Array, sigma, convention: str = "norm") -> jax.Array:
  """Isotropic normalized noise (family 1): ||x|| normalize(x/||x|| + s eps), eps ~ N(0, I).

  x [..., D]; sigma a scalar (traced is fine); s = `noise_scale(sigma, D, convention)`. The same key
  gives the same eps for every sigma (common random numbers across a sweep). sigma = 0 returns x
  exactly (bit for bit), as do the other families.
  """
  u = unit(x)
  eps = jax.random.normal(key, x.shape, jnp.float32)
  s = noise_scale(sigma, x.shape[-1], convention)
  return jnp.where(sigma == 0, x, unit(u + s * eps) * jnp.linalg.norm(x, axis=-1, keepdims=True))


def random_direction(key: jax.Array, d: int) -> jax.Array:
  """A uniformly random unit vector [D]."""
  return unit(jax.random.normal(key, (d,), jnp.float32))


def directional(x: jax.Array, sigma, direction: jax.Array) -> jax.Array:
  """Directional drift (family 2): ||x|| normalize(x/||x|| + sigma v), v = unit(direction) [D]."""
  v = unit(direction)
  return jnp.where(sigma == 0, x, unit(unit(x) + sigma * v) * jnp.linalg.norm(x, axis=-1, keepdims=True))


def random_basis(key: jax.Array, d: int, k: int) -> jax.Array:
  """Orthonormal basis [D, k] of a uniformly random k-dimensional subspace (QR of a Gaussian)."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (d, k), jnp.float32))
  return q * jnp.sign(jnp.diagonal(r))[None]


def principal_basis(x: jax.Array, k: int) -> jax.Array:
  """Orthonormal basis [D, k] of the top-k principal directions of the unit rows of x [N, D]
  (k <= min(N, D)): the subspace the data actually vary in, for subspace drift that hits it."""
  u = unit(jnp.asarray(x, jnp.float32))
  _, _, vt = jnp.linalg.svd(u - jnp.mean(u, 0), full_matrices=False)
  return vt[:k].T


def subspace_rotation(x: jax.Array, sigma, basis: jax.Array) -> jax.Array:
  """Subspace drift (family 3): rotate x [..., D] by theta = atan(sigma) in the planes
  (basis[:, 0], basis[:, 1]), (basis[:, 2], basis[:, 3]), ... of `basis` [D, k] (orthonormal
  columns); identity outside span(basis). Norms are preserved exactly (up to rounding)."""
  k = basis.shape[1]
  theta = jnp.arctan(sigma)
  c = x @ basis  # [..., k]
  m = k // 2
  a, b = c[..., 0:2 * m:2], c[..., 1:2 * m:2]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  ra, rb = a * cos - b * sin, a * sin + b * cos
  new = jnp.stack([ra, rb], -1).reshape(c.shape[:-1] + (2 * m,))
  if k % 2:
    new = jnp.concatenate([new, c[..., -1:]], -1)
  return x + (new - c) @ basis.T


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Drift:
  """One synthetic drift family with its fixed parts, applied by `apply_drift(drift, key, x, sigma)`.

  family: one of FAMILIES. convention: isotropic only ("norm" | "coord"). direction [D]:
  directional only. basis [D, k]: subspace only.
  """

  family: str = dataclasses.field(metadata=dict(static=True))
  convention: str = dataclasses.field(default="norm", metadata=dict(static=True))
  direction: jax.Array | None = None
  basis: jax.Array | None = None


def make_drift(family: str, key: jax.Array, d: int, *, k: int = 64, convention: str = "norm",
               direction: jax.Array | None = None, basis: jax.Array | None = None) -> Drift:
  """A `Drift` of `family` in dimension d, its direction / subspace drawn from `key` unless given.

  k: subspace dimension (subspace family).
  """
  if family == "isotropic":
    noise_scale(1.0, d, convention)  # validates the convention
    return Drift(family, convention)
  if family == "directional":
    return Drift(family, direction=random_direction(key, d) if direction is None else unit(jnp.asarray(direction)))
  if family == "subspace":
    if basis is None:
      if not 1 <= k <= d:
        raise ValueError(f"subspace dimension k={k} must be in [1, {d}]")
      basis = random_basis(key, d, k)
    return Drift(family, basis=jnp.asarray(basis, jnp.float32))
  raise ValueError(f"unknown drift family {family!r}; expected one of {FAMILIES}")


def apply_drift(drift: Drift, key: jax.Array, x: jax.Array, sigma) -> jax.Array:
  """Drifted x [..., D] at magnitude sigma (scalar). key is used by the isotropic family only."""
  if drift.family == "isotropic":
    return isotropic(key, x, sigma, drift.convention)
  if drift.family == "directional":
    return directional(x, sigma, drift.direction)
  if drift.family == "subspace":
    return subspace_rotation(x, sigma, drift.basis)
  raise ValueError(f"unknown drift family {drift.family!r}")


# --- Real drift ------------------------------------------------------------------------------------


def perturb_weights(key: jax.Array, params, rho: float, *, stacked: str = "layers"):
  """A copy of `params` with every weight matrix W replaced by W + rho ||W||_F / sqrt(n) Z.

  Z ~ N(0, 1) elementwise, n = W.size, so ||dW||_F ~ rho ||W||_F: a *relative* perturbation of size
  rho. Leaves whose key path contains `stacked` carry a leading layer axis and are perturbed per
  layer slice (each layer's matrix gets its own norm). Vectors (norm gains, biases) are left as they
  are. A known-size stand-in for the drift between two checkpoints of one model. Leaf i uses
  split(key, n_leaves)[i]; each leaf is one jitted call (cheaper to compile than the whole tree).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, max(len(flat), 1))
  out = []
  for k, (path, w) in zip(keys, flat):
    per_layer = stacked in jax.tree_util.keystr(path)
    if w is None or w.ndim - int(per_layer) < 2:
      out.append(w)
      continue
    out.append(_perturb_leaf(k, w, jnp.float32(rho), per_layer))
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("per_layer",))
def _perturb_leaf(key, w, rho, per_layer: bool):
  axes = tuple(range(1 if per_layer else 0, w.ndim))
  w32 = w.astype(jnp.float32)
  n = math.prod(w.shape[a] for a in axes)
  norm = jnp.sqrt(jnp.sum(w32 * w32, axis=axes, keepdims=True))
  return (w32 + rho * norm / math.sqrt(n) * jax.random.normal(key, w.shape, jnp.float32)).astype(w.dtype)


def equivalent_sigma(angle_deg) -> jax.Array:
  """The norm-convention sigma whose drift turns vectors by `angle_deg` degrees: tan(angle)."""
  return jnp.tan(jnp.radians(jnp.asarray(angle_deg, jnp.float32)))


# --- Re-anchoring ----------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Alignment:
  """An affine map x -> (x - mean_src) @ rotation * scale + mean_dst with `rotation` [D, D]
  orthogonal; learned by `fit_procrustes`, applied by `apply_alignment`."""

  rotation: jax.Array
  mean_src: jax.Array
  mean_dst: jax.Array
  scale: jax.Array


def fit_procrustes(x_src: jax.Array, x_dst: jax.Array, *, center: bool = True, scale: bool = False,
                   identity_prior: float = 0.0, weights: jax.Array | None = None) -> Alignment:
  """Orthogonal Procrustes: R = argmin_{R^T R = I} ||(X_src - m_src) R - (X_dst - m_dst)||_F^2
                                                   + identity_prior * n * ||R - I||_F^2.

  x_src [n, D]: the anchors embedded by the new model (B); x_dst [n, D]: the same anchors embedded by
  the model the probe was trained on (A). Solution: R = U V^T with U S V^T the SVD of
  Xs^T Xd / n + identity_prior I (Schoenemann 1966; the prior adds to the cross-covariance because
  ||R - I||^2 = 2D - 2 tr R for orthogonal R). With n < D anchors the loss alone leaves R free on
  the directions the anchors do not span; identity_prior > 0 picks the rotation nearest the identity
  there (use it unless n >> D). With the prior 0, n >= D anchors in general position and
  X_dst = X_src R* exactly, R = R* exactly.
  center: fit and apply translations (means of the anchors). scale: also fit a global scale
  s = tr(S) / ||Xs||_F^2. weights [n] >= 0: per-anchor weights (means, sums and 1/n above become
  weighted; weight 0 drops an anchor, so a traced anchor count needs no recompilation).
  """
  x_src = jnp.asarray(x_src, jnp.float32)
  x_dst = jnp.asarray(x_dst, jnp.float32)
  n, d = x_src.shape
  w = jnp.full((n,), 1.0 / n, jnp.float32) if weights is None else weights / jnp.sum(weights)
  m_src = w @ x_src if center else jnp.zeros(d, jnp.float32)
  m_dst = w @ x_dst if center else jnp.zeros(d, jnp.float32)
  xs, xd = x_src - m_src, x_dst - m_dst
  cross = (xs * w[:, None]).T @ xd
  u, _, vt = jnp.linalg.svd(cross + identity_prior * jnp.eye(d, dtype=jnp.float32))
  r = u @ vt
  s = (w @ jnp.sum(xs @ r * xd, 1)) / (w @ jnp.sum(xs * xs, 1)) if scale else jnp.ones((), jnp.float32)
  return Alignment(r, m_src, m_dst, s)


def apply_alignment(a: Alignment, x: jax.Array) -> jax.Array:
  """x [..., D] in the source (new-model) space -> the destination (probe's) space."""
  return (x - a.mean_src) @ a.rotation * a.scale + a.mean_dst
