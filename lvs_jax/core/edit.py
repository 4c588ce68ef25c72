"""The edit protocol: one pytree that describes an intervention on the whole model.

Sites (named as interpretability libraries do), per layer l:

  resid_pre   the residual stream entering block l (output of block l-1, or the embeddings)
  attn_out    the attention block's output, before it is added to the residual stream
  mlp_out     the MLP block's output, before it is added to the residual stream
  resid_post  the residual stream leaving block l (= resid_pre of block l+1)

An `Edit` maps site name -> `SiteEdit`. Every leaf of a `SiteEdit` carries a leading layer axis L
(= cfg.n_layers), so it is scanned together with the stacked layer weights: "which layer" is data
(a zero add, a zero mask), not Python control flow. The remaining axes broadcast against the
activation `h: [B, T, D]` at that site, with the token axis indexing *sequence slots* S of the
(left-padded) buffer:

  add       [L, B|1, S|1, D]    h += add                         (absolute units of h)
  add_rel   [L, B|1, S|1, D]    h += add_rel * ||h||_2            (relative to the per-token norm
                                                                   of h *before* this edit)
  ablate    dirs [L, k, D], mask [L, B|1, S|1]
                                h -= mask * (h @ U^T) @ U        (U = orthonormal rows of dirs)
  scale     [L, B|1, S|1, 1|D]  h *= scale
  add_shared [B|1, S|1, D], add_layers [L]
                                h += add_layers[l] * add_shared  (absolute units; one tensor shared by
                                                                   every layer, so a one-layer edit of
                                                                   a full [B, S, D] tensor costs
                                                                   O(B S D), not O(L B S D))

Order within a site: ablate, then scale, then add/add_shared/add_rel (all computed from the
ablated-scaled h; add_rel uses ||h|| before any edit). A leaf may be None (that op is absent, decided
at trace time). `add_shared` is the one leaf without the leading L axis: the layer loop closes over it
instead of scanning it (`shared_leaves` / `with_shared`).
The identity edit (`identity`) has every op present with neutral values: it goes down the same code
path and reproduces the unedited logits bit for bit.

Slots: when the model runs on T tokens that occupy slots [start, start + T) of the buffer (start = 0
for a plain forward; the cache index during decoding), an S axis of size 1 broadcasts to every slot
and an S axis of size > 1 is sliced to [start, start + T). During generation the buffer has
prompt_len + max_new_tokens slots, so an edit with S = 1 applies at every prompt and generated
position, and one with a full S axis says exactly where.

Edits are vmappable (add a leading sweep axis to every leaf and `jax.vmap` the forward) and
differentiable (`jax.grad` with respect to `add`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SiteEdit:
  """The operations applied at one site, for every layer (leading axis L). See module docstring."""

  add: jax.Array | None = None
  add_rel: jax.Array | None = None
  ablate_dirs: jax.Array | None = None
  ablate_mask: jax.Array | None = None
  scale: jax.Array | None = None
  add_shared: jax.Array | None = None
  add_layers: jax.Array | None = None


Edit = Mapping[str, SiteEdit]
"""site name -> SiteEdit. A plain dict is a pytree, so `Edit` needs no class of its own."""


def validate(edit: Edit, n_layers: int) -> None:
  """Raises one clear error if `edit` names an unknown site or lacks the leading layer axis."""
  for site, se in edit.items():
    if site not in SITES:
      raise ValueError(f"unknown edit site {site!r}; expected one of {SITES}")
    if (se.ablate_dirs is None) != (se.ablate_mask is None):
      raise ValueError(f"edit[{site!r}]: ablate_dirs and ablate_mask must be given together")
    if (se.add_shared is None) != (se.add_layers is None):
      raise ValueError(f"edit[{site!r}]: add_shared and add_layers must be given together")
    if se.add_shared is not None and se.add_shared.ndim != 3:
      raise ValueError(f"edit[{site!r}].add_shared must be [B|1, S|1, D], got shape {tuple(se.add_shared.shape)}")
    for name, leaf in vars(se).items():
      if leaf is None or name == "add_shared":
        continue
      if leaf.ndim == 0 or leaf.shape[0] != n_layers:
        raise ValueError(
          f"edit[{site!r}].{name} must have a leading layer axis of size {n_layers}, "
          f"got shape {tuple(leaf.shape)}"
        )


def shared_leaves(edit: Edit | None) -> tuple[Edit | None, dict | None]:
  """Splits an edit into (the part scanned over layers, {site: add_shared}) for the layer loop."""
  if edit is None:
    return None, None
  scanned = {site: dataclasses.replace(se, add_shared=None) for site, se in edit.items()}
  return scanned, {site: se.add_shared for site, se in edit.items()}


def with_shared(layer_edit: Edit | None, shared: dict | None) -> Edit | None:
  """One layer's slice of the scanned part, with the shared leaves put back (inverse of shared_leaves)."""
  if layer_edit is None:
    return None
  return {site: dataclasses.replace(se, add_shared=shared[site]) for site, se in layer_edit.items()}


def _slots(x: jax.Array, start: jax.Array | int, t: int, axis: int) -> jax.Array:
  """Slices the slot axis to [start, start+t) unless it has size 1 (broadcast)."""
  if x.shape[axis] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, t, axis=axis)


def orthonormalize(dirs: jax.Array) -> jax.Array:
  """[..., k, D] -> rows spanning the same subspace, orthonormal (via QR in float32)."""
  q, _ = jnp.linalg.qr(jnp.swapaxes(dirs.astype(jnp.float32), -1, -2))
  return jnp.swapaxes(q, -1, -2)


def apply_site(h: jax.Array, se: SiteEdit | None, start: jax.Array | int) -> jax.Array:
  """Applies one layer's slice of a SiteEdit to h: [B, T, D]. Leaves have lost their L axis here."""
  if se is None:
    return h
  t = h.shape[1]
  dtype = h.dtype
  norm = None
  if se.add_rel is not None:
    norm = jnp.linalg.norm(h.astype(jnp.float32), axis=-1, keepdims=True)
  if se.ablate_dirs is not None:
    u = se.ablate_dirs.astype(jnp.float32)  # [k, D], orthonormal rows
    mask = _slots(se.ablate_mask, start, t, axis=1)[..., None].astype(jnp.float32)  # [B|1, T|1, 1]
    hf = h.astype(jnp.float32)
    proj = jnp.einsum("btd,kd->btk", hf, u) @ u
    h = (hf - mask * proj).astype(dtype)
  if se.scale is not None:
    h = h * _slots(se.scale, start, t, axis=1).astype(dtype)
  if se.add is not None:
    h = h + _slots(se.add, start, t, axis=1).astype(dtype)
  if se.add_shared is not None:
    h = h + (se.add_layers * _slots(se.add_shared, start, t, axis=1)).astype(dtype)
  if se.add_rel is not None:
    h = h + (_slots(se.add_rel, start, t, axis=1) * norm).astype(dtype)
  return h


# ----------------------------------------------------------------------------- constructors


def identity(n_layers: int, d_model: int, sites=SITES, n_ablate: int = 1, dtype=jnp.float32) -> Edit:
  """An edit with every op present and neutral: forward(edit=identity(...)) == forward()."""
  out = {}
  for site in sites:
    dirs = jnp.zeros((n_layers, n_ablate, d_model), dtype).at[:, :, 0].set(1.0)
    out[site] = SiteEdit(
      add=jnp.zeros((n_layers, 1, 1, d_model), dtype),
      add_rel=jnp.zeros((n_layers, 1, 1, d_model), dtype),
      ablate_dirs=dirs,
      ablate_mask=jnp.zeros((n_layers, 1, 1), dtype),
      scale=jnp.ones((n_layers, 1, 1, 1), dtype),
      add_shared=jnp.zeros((1, 1, d_model), dtype),
      add_layers=jnp.zeros((n_layers,), dtype),
    )
  return out


def layer_mask(n_layers: int, layers) -> jax.Array:
  """[L] float mask, 1 at `layers` (an int, a sequence, or a traced int) and 0 elsewhere."""
  layers = jnp.atleast_1d(jnp.asarray(layers))
  return (jnp.arange(n_layers)[:, None] == layers[None, :]).any(-1).astype(jnp.float32)


def add_vector(
  n_layers: int, layers, vector: jax.Array, site: str = "resid_pre", relative: bool = False,
  positions: jax.Array | None = None,
) -> Edit:
  """Adds `vector` [D] (or [B|1, S|1, D]) at `layers` of `site`.

  relative=True makes the vector's units multiples of the per-token activation norm ||h||
  (so ||vector|| = 0.1 adds 10% of the activation norm). `positions`: [B|1, S] 0/1 slot mask.
  """
  v = jnp.asarray(vector)
  while v.ndim < 3:
    v = v[None]
  if positions is not None:
    v = v * jnp.asarray(positions, v.dtype)[..., None]
  full = layer_mask(n_layers, layers).astype(v.dtype)[:, None, None, None] * v[None]
  return {site: SiteEdit(add_rel=full) if relative else SiteEdit(add=full)}


def add_at_layer(n_layers: int, layer, add: jax.Array, site: str = "resid_pre") -> Edit:
  """Adds `add` [B|1, S|1, D] (absolute units) at `layer` of `site` only, storing it once (add_shared):
  O(B S D) memory instead of the O(L B S D) of an `add` leaf with a layer axis. `layer`: an int, a
  sequence or a traced int."""
  add = jnp.asarray(add)
  if add.ndim != 3:
    raise ValueError(f"add_at_layer: add must be [B|1, S|1, D], got shape {tuple(add.shape)}")
  return {site: SiteEdit(add_shared=add, add_layers=layer_mask(n_layers, layer).astype(add.dtype))}


def ablate_directions(
  n_layers: int, directions: jax.Array, layers=None, sites=SITES,
  positions: jax.Array | None = None, per_layer: bool = False,
) -> Edit:
  """Projects the span of `directions` out of `sites`: [D] or [k, D] (the same subspace at every layer)
  or, with per_layer=True, [L, D] or [L, k, D] (layer l's own subspace at layer l). Directions need
  not be orthonormal.

  layers=None ablates at every layer (the refusal-direction recipe ablates at every layer and
  site). `positions`: [B|1, S] 0/1 slot mask, default every position.
  """
  d = jnp.asarray(directions)
  if per_layer:
    if d.ndim == 2:
      d = d[:, None, :]
    if d.ndim != 3 or d.shape[0] != n_layers:
      raise ValueError(f"ablate_directions(per_layer=True): directions must be [L={n_layers}, D] or "
                       f"[L, k, D], got shape {tuple(d.shape)}")
    stacked = orthonormalize(d)
  else:
    if d.ndim not in (1, 2):
      raise ValueError(f"ablate_directions: directions must be [D] or [k, D], got shape {tuple(d.shape)} "
                       "(per-layer directions need per_layer=True)")
    dirs = orthonormalize(jnp.atleast_2d(d))
    stacked = jnp.broadcast_to(dirs[None], (n_layers, *dirs.shape))
  lm = jnp.ones((n_layers,)) if layers is None else layer_mask(n_layers, layers)
  pos = jnp.ones((1, 1)) if positions is None else jnp.asarray(positions, jnp.float32)
  mask = lm[:, None, None] * pos[None]
  return {s: SiteEdit(ablate_dirs=stacked, ablate_mask=mask) for s in sites}


def merge(*edits: Edit) -> Edit:
  """Combines edits on different sites (or different ops of one site) into one."""
  out: dict[str, SiteEdit] = {}
  for e in edits:
    for site, se in e.items():
      if site not in out:
        out[site] = se
        continue
      prev = vars(out[site]).copy()
      for name, leaf in vars(se).items():
        if leaf is None:
          continue
        if prev[name] is not None:
          raise ValueError(f"merge: both edits set {site}.{name}; combine them explicitly")
        prev[name] = leaf
      out[site] = SiteEdit(**prev)
  return out
