"""A label-free drift alarm: a permutation two-sample test of incoming embeddings against a reference.

Setting: a probe is deployed on model A's embeddings. A *reference window* X_ref [m, D] of recent
undrifted traffic is kept; every *incoming window* X_new [n, D] is tested against it, without
labels. The alarm fires when the permutation p-value of a two-sample statistic is <= alpha.

Statistics (all on unit-normalized rows u; a `Reference` fitted once on separate undrifted data
X_fit supplies the mean mu, the top-k principal directions P [D, k] and their std s [k]):

  "residual"  mean_new r - mean_ref r,  r(u) = ||(I - P P^T)(u - mu)||^2: the energy off the
              reference's principal subspace. Real embeddings concentrate near a low-dimensional
              subspace; isotropic, directional and rotational drift all move energy out of it.
              One-sided (fires on an increase).
  "mean"      ||mean_new z - mean_ref z||^2 with z = P^T (u - mu) / s the whitened top-k
              coordinates: a mean-direction (Hotelling-type, diagonal) test.
  "mmd"       the biased MMD^2 between the windows with a Gaussian kernel on u, bandwidth the
              median pairwise distance of X_fit (Gretton et al. 2012).

Calibration: p = (1 + #{perm : T_perm >= T_obs}) / (1 + n_perm) over random relabelings of the
pooled m + n rows. Under no drift the pooled rows are exchangeable, so P(p <= alpha) <= alpha
exactly, for any statistic, window size and n_perm: the false-alarm rate is at most alpha by
construction (as long as X_fit is disjoint from the windows). Everything is jittable and vmaps over
windows and keys.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lvs_jax.evals import stats

STATISTICS = ("residual", "mean", "mmd")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Reference:
  """Statistics of undrifted embeddings. mean [D], basis [D, k] (top-k principal directions),
  scale [k] (their std), bandwidth [] (median pairwise distance of the unit rows)."""

  mean: jax.Array
  basis: jax.Array
  scale: jax.Array
  bandwidth: jax.Array


def _unit(x):
  return stats.unit(jnp.asarray(x, jnp.float32))


def _sqdist(a, b):
  return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None] - 2.0 * a @ b.T, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def fit_reference(x_fit: jax.Array, k: int = 16) -> Reference:
  """A `Reference` from undrifted embeddings x_fit [N, D] (N > k), disjoint from the test windows."""
  u = _unit(x_fit)
  mu = jnp.mean(u, 0)
  _, sv, vt = jnp.linalg.svd(u - mu, full_matrices=False)
  iu = jnp.triu_indices(u.shape[0], 1)
  bw = jnp.sqrt(jnp.median(_sqdist(u, u)[iu]))
  return Reference(mu, vt[:k].T, sv[:k] / jnp.sqrt(u.shape[0]) + 1e-8, bw)


def features(ref: Reference, x: jax.Array, statistic: str) -> jax.Array:
  """Per-row features [N, F] the statistic averages: residual [N, 1], mean [N, k], mmd: unit rows [N, D]."""
  u = _unit(x)
  if statistic == "mmd":
    return u
  c = u - ref.mean
  proj = c @ ref.basis
  if statistic == "residual":
    return (jnp.sum(c * c, 1) - jnp.sum(proj * proj, 1))[:, None]
  if statistic == "mean":
    return proj / ref.scale
  raise ValueError(f"unknown statistic {statistic!r}; expected one of {STATISTICS}")


def _stat(feat_or_kernel, is_new, statistic):
  """Statistic of the pooled rows split by the boolean mask is_new [m + n]."""
  w_new = is_new.astype(jnp.float32) / jnp.sum(is_new.astype(jnp.float32))
  w_ref = (~is_new).astype(jnp.float32) / jnp.sum((~is_new).astype(jnp.float32))
  w = w_new - w_ref
  if statistic == "mmd":
    return w @ feat_or_kernel @ w  # = MMD_b^2
  diff = w @ feat_or_kernel
  return diff[0] if statistic == "residual" else jnp.sum(diff * diff)


@functools.partial(jax.jit, static_argnames=("statistic", "n_perm"))
def two_sample_test(key: jax.Array, ref: Reference, x_ref: jax.Array, x_new: jax.Array, statistic: str = "residual",
         n_perm: int = 200) -> tuple[jax.Array, jax.Array]:
  """Permutation test of x_new [n, D] against x_ref [m, D] -> (statistic [], p-value [])."""
  pooled = jnp.concatenate([features(ref, x_ref, statistic), features(ref, x_new, statistic)])
  if statistic == "mmd":
    pooled = jnp.exp(-_sqdist(pooled, pooled) / (2.0 * ref.bandwidth ** 2))
  m, n = x_ref.shape[0], x_new.shape[0]
  is_new = jnp.arange(m + n) >= m
  t_obs = _stat(pooled, is_new, statistic)
  perms = jax.vmap(lambda k: jax.random.permutation(k, is_new))(jax.random.split(key, n_perm))
  t_perm = jax.vmap(lambda mask: _stat(pooled, mask, statistic))(perms)
  p = (1.0 + jnp.sum((t_perm >= t_obs).astype(jnp.float32))) / (1.0 + n_perm)
  return t_obs, p


def alarm(key: jax.Array, ref: Reference, x_ref: jax.Array, x_new: jax.Array, statistic: str = "residual",
          alpha: float = 0.05, n_perm: int = 200) -> jax.Array:
  """Whether the alarm fires (p <= alpha) for incoming window x_new against reference window x_ref."""
  return two_sample_test(key, ref, x_ref, x_new, statistic, n_perm)[1] <= alpha
