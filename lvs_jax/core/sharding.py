"""Sharding from logical axis names: a rules table maps each weight's logical axes to mesh axes.

Mesh axes: "data" (prompts, sweep cells: the natural data-parallel axis; also FSDP for weights)
and "model" (tensor parallel over heads and MLP hidden). Every weight's logical axes are declared
once in `lvs_jax.core.model.LOGICAL_AXES`; a rules table here says where each goes:

  REPLICATED  every weight on every device (small models; the default on one device)
  FSDP        weights sharded along d_model ("embed") over "data" (7B-class models)
  TENSOR      heads / MLP hidden over "model", d_model over "data"

A logical axis whose mesh axis does not divide it falls back to replicated for that weight.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig

REPLICATED: dict[str, str | None] = {}
FSDP = {"embed": "data"}
TENSOR = {"embed": "data", "q_heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}


def make_mesh(data: int | None = None, model: int = 1) -> Mesh:
  """A ("data", "model") mesh over the local devices; data defaults to n_devices // model.

  Axes are Auto (GSPMD propagation): the kernels carry no sharding annotations of their own.
  """
  n = len(jax.devices())
  data = data or n // model
  if data * model > n:
    raise ValueError(f"mesh {data}x{model} needs {data * model} devices, have {n}")
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=jax.devices()[: data * model])


def _spec(axes, shape, rules, mesh: Mesh) -> P:
  out = []
  for name, size in zip(axes, shape):
    mesh_axis = rules.get(name)
    if mesh_axis is not None and size % mesh.shape[mesh_axis] == 0 and mesh_axis not in out:
      out.append(mesh_axis)
    else:
      out.append(None)
  return P(*out)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=REPLICATED, dtype=np.float32) -> model_lib.Params:
  """A Params pytree of NamedShardings (derived from the abstract shapes: no memory used)."""
  abstract = model_lib.abstract_params(cfg, dtype)
  # Look axes up by path: weights absent from this config (e.g. biases) are None in `abstract`.
  axes = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(model_lib.LOGICAL_AXES, is_leaf=lambda x: isinstance(x, tuple))[0]}
  return jax.tree_util.tree_map_with_path(
    lambda k, a: NamedSharding(mesh, _spec(axes[jax.tree_util.keystr(k)], a.shape, rules, mesh)), abstract)


def shard_params(params: model_lib.Params, cfg: ModelConfig, mesh: Mesh, rules=REPLICATED) -> model_lib.Params:
  """Places `params` on the mesh according to `rules`."""
  return jax.device_put(params, param_shardings(cfg, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading axis (prompts or sweep cells) over "data", the rest replicated."""
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))
