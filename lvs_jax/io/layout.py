"""Checkpoint tensors <-> `Params`: one name table per format, shapes from `model.abstract_params`.

Checkpoints (GGUF, HF safetensors) store one tensor per layer in the torch `[out, in]` layout; we
stack layers on a leading axis in the `x @ w` layout with heads split out (`wq` [L, D, H, Dh], `wo`
[L, H, Dh, D]). A format is described by two tables, {tensor name: (Params field, n_in)}: `n_in` is
the number of leading input axes of our per-layer weight, 0 for vectors (norms, biases) and None for
a tensor stored in our layout (the embedding table [V, D]). From them and `abstract_params(cfg)`
follow, with no second shape table to keep in sync:

  torch shape  = (prod(ours[n_in:]), prod(ours[:n_in]))  for n_in > 0; (prod(ours),) for 0; ours for None
  ours         = torch.T.reshape(ours)                     for n_in > 0; torch.reshape(ours) otherwise

Fields that `abstract_params` leaves None (an untied `lm_head`, the q/k/v biases) have no tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig

# {tensor name (per-layer names without their layer prefix): (Params / LayerParams field, n_in)}
Table = Mapping[str, tuple[str, int | None]]


def torch_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
  """The checkpoint (torch `[out, in]`) shape of one of our weights of shape `shape` (no layer axis)."""
  if n_in is None:
    return tuple(shape)
  if n_in == 0:
    return (math.prod(shape),)
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def from_torch(w: np.ndarray, shape: tuple[int, ...], n_in: int | None) -> np.ndarray:
  """A checkpoint tensor in torch layout -> our layout of `shape` (no layer axis)."""
  return w.T.reshape(shape) if n_in else w.reshape(shape)


def to_torch(x: np.ndarray, n_in: int | None) -> np.ndarray:
  """One of our weights (no layer axis) -> the checkpoint's torch layout."""
  if n_in is None:
    return x
  return x.reshape(-1) if n_in == 0 else x.reshape(math.prod(x.shape[:n_in]), -1).T


def _entries(cfg: ModelConfig, top: Table, layer: Table, prefix: Callable[[int], str]):
  """(tensor name, field, layer index or None, our shape without layer axis, n_in) for every tensor
  the config implies, in checkpoint order (top-level first, then layer by layer)."""
  abstract = model_lib.abstract_params(cfg)
  out = []
  for name, (field, n_in) in top.items():
    a = getattr(abstract, field)
    if a is not None:
      out.append((name, field, None, tuple(a.shape), n_in))
  for i in range(cfg.n_layers):
    for name, (field, n_in) in layer.items():
      a = getattr(abstract.layers, field)
      if a is not None:
        out.append((prefix(i) + name, field, i, tuple(a.shape[1:]), n_in))
  return out


def expected_shapes(cfg: ModelConfig, top: Table, layer: Table, prefix: Callable[[int], str]) -> dict[str, tuple]:
  """Checkpoint tensor name -> torch-layout shape that `cfg` implies."""
  return {name: torch_shape(shape, n_in) for name, _, _, shape, n_in in _entries(cfg, top, layer, prefix)}


def read_params(cfg: ModelConfig, dtype, top: Table, layer: Table, prefix: Callable[[int], str],
                get: Callable[[str], np.ndarray], host: bool = False) -> model_lib.Params:
  """Stacked `Params` of `dtype` from `get(name)` (a torch-layout numpy tensor; shapes already checked).
  host=True keeps every leaf a numpy array in host memory (nothing on a device: for `sharding.place_params`)."""
  put = (lambda x: x) if host else jnp.asarray
  np_dtype = jnp.dtype(dtype)  # numpy-compatible (bfloat16 via ml_dtypes)
  abstract = model_lib.abstract_params(cfg)
  bufs = {f: np.empty(a.shape, np_dtype) for f, a in vars(abstract.layers).items() if a is not None}
  tops = {}
  for name, field, i, shape, n_in in _entries(cfg, top, layer, prefix):
    w = from_torch(get(name), shape, n_in)
    if i is None:
      tops[field] = put(w.astype(np_dtype))
    else:
      bufs[field][i] = w
  layers = model_lib.LayerParams(**{f: put(b) for f, b in bufs.items()})
  return model_lib.Params(layers=layers, **{f: tops.get(f) for f in ("embed", "final_norm", "lm_head")})


def place(params: model_lib.Params, cfg: ModelConfig, mesh=None, rules=None) -> model_lib.Params:
  """Host-read `params` (numpy leaves) as they leave a loader: unchanged without a mesh, else put leaf by
  leaf straight into their shardings (`sharding.place_params`; rules: a table of `lvs_jax.core.sharding`,
  default REPLICATED), so no weight is ever whole on one device."""
  if mesh is None:
    return params
  from lvs_jax.core import sharding

  return sharding.place_params(params, cfg, mesh, sharding.REPLICATED if rules is None else rules)


def write_tensors(params: model_lib.Params, cfg: ModelConfig, top: Table, layer: Table,
                  prefix: Callable[[int], str], dtype=None) -> dict[str, np.ndarray]:
  """`Params` -> checkpoint-named numpy tensors in torch layout (dtype: the params' own by default)."""
  np_dtype = jnp.dtype(dtype) if dtype is not None else None
  cache = {}

  def arr(obj, field):
    if (id(obj), field) not in cache:
      x = np.asarray(jax.device_get(getattr(obj, field)))
      cache[(id(obj), field)] = x.astype(np_dtype) if np_dtype is not None else x
    return cache[(id(obj), field)]

  out = {}
  for name, field, i, _, n_in in _entries(cfg, top, layer, prefix):
    x = arr(params, field) if i is None else arr(params.layers, field)[i]
    out[name] = np.ascontiguousarray(to_torch(x, n_in))
  return out
