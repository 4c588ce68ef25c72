"""Sharding from logical axis names, and the sharded kernels: sweep, PGD grid, candidate losses,
generation and the train step on a device mesh (one process or many under `jax.distributed`).

Mesh axes: "data" (prompts, sweep cells, candidates: the natural data-parallel axis; also FSDP for
weights) and "model" (tensor parallel over heads and MLP hidden). Every weight's logical axes are
declared once in `lvs_jax.core.model.LOGICAL_AXES`; a rules table here says where each goes:

  REPLICATED  every weight on every device (small models; the default on one device)
  FSDP        weights sharded along d_model ("embed") over "data" (7B-class models)
  TENSOR      heads / MLP hidden over "model", d_model over "data"

A logical axis whose mesh axis does not divide it falls back to replicated for that weight.

The kernels themselves (`lvs_jax.lvs.sweeps`, `lvs_jax.lvs.attack`, `lvs_jax.core.generate`,
`lvs_jax.training.core`) carry no sharding annotations: the functions here place their inputs
(weights by the rules table, the leading prompt / candidate axis over "data", small arrays
replicated) and let GSPMD partition the compiled function. Inputs come from host numpy and go
straight into their shards (`distributed.host_to_global`), so the same code runs on one process or
on every process of a multi-host job; results come back as numpy on every process. A batch whose
size the "data" axis does not divide is padded with copies of its last row, and the padding is
removed from the results.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lvs_jax.core import distributed
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


def abstract_mesh(data: int, model: int = 1) -> AbstractMesh:
  """A ("data", "model") mesh of the given shape without devices: shard shapes for planning (memory.py)."""
  return AbstractMesh((data, model), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_size(mesh) -> int:
  return int(mesh.shape["data"])


def abstract_sharded_params(cfg: ModelConfig, mesh: Mesh, rules=REPLICATED, dtype=jnp.float32) -> model_lib.Params:
  """`jax.ShapeDtypeStruct`s with their shardings: the target to restore weights into (orbax) or to lower
  a step against, costing no memory."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      model_lib.abstract_params(cfg, dtype), param_shardings(cfg, mesh, rules))


def place_params(params: model_lib.Params, cfg: ModelConfig, mesh: Mesh, rules=REPLICATED) -> model_lib.Params:
  """Weights held in host memory (numpy leaves, e.g. `load_hf_params(..., host=True)`, or any arrays) put
  straight into their shardings leaf by leaf: each device receives only its own shard, no weight is
  ever whole on one device. Works on every process of a multi-host job (each holds the host copy)."""
  model_lib.check_params(params, cfg)
  sh = param_shardings(cfg, mesh, rules)
  return jax.tree.map(lambda x, s: distributed.host_to_global(np.asarray(x), s), params, sh)


def with_shardings(tree, shardings):
  """`jax.ShapeDtypeStruct`s of `tree` (arrays or structs) carrying `shardings`: an orbax restore target
  (`Checkpointer.restore_latest(with_shardings(state, state_shardings(...)))` restores every leaf
  directly into its shards)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- data-parallel inputs


def _leading(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[axis] = "data"
  return NamedSharding(mesh, P(*spec))


def pad_rows(x: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
  """x with its `axis` padded to n by repeating the last row (real data: no NaN from empty rows)."""
  x = np.asarray(x)
  extra = n - x.shape[axis]
  if extra <= 0:
    return x
  last = np.take(x, [x.shape[axis] - 1], axis=axis)
  return np.concatenate([x, np.repeat(last, extra, axis=axis)], axis=axis)


def padded_size(n: int, mesh: Mesh) -> int:
  d = data_size(mesh)
  return -(-n // d) * d


def shard_rows(tree, mesh: Mesh, axis: int = 0, rows: int | None = None):
  """Every array leaf of `tree` (host or device) as a global array with `axis` over "data", padded to
  `rows` (default: the next multiple of the data axis)."""
  def put(x):
    x = np.asarray(x)
    n = rows or padded_size(x.shape[axis], mesh)
    return distributed.host_to_global(pad_rows(x, n, axis), _leading(mesh, x.ndim, axis))
  return jax.tree.map(put, tree)


def replicate(tree, mesh: Mesh):
  """Every array leaf of `tree` replicated on the mesh (from host values held by every process)."""
  return jax.tree.map(lambda x: distributed.host_to_global(np.asarray(x), replicated(mesh)), tree)


def _unpad(tree, n: int, axis_from_end: int | None = None, axis: int | None = None):
  """numpy copies of every leaf, the padded rows (index >= n along the prompt axis) removed."""
  def cut(x):
    x = distributed.to_host(x)
    ax = axis if axis is not None else x.ndim - axis_from_end
    return np.take(x, np.arange(n), axis=ax) if 0 <= ax < x.ndim and x.shape[ax] > n else x
  return jax.tree.map(cut, tree)


# ----------------------------------------------------------------------------- sharded kernels


def sweep(params, cfg: ModelConfig, batch, layers, magnitudes, directions, refusal_ids, mesh: Mesh, **kw) -> dict:
  """`lvs_jax.lvs.sweeps.sweep` with the prompts over "data" (`params` already placed, e.g. by
  `place_params`). Returns the same dict as numpy: cell metrics [nL, nM, nD, B], clean metrics [B]."""
  from lvs_jax.lvs import sweeps

  B = batch.tokens.shape[0]
  fields = dict(tokens=batch.tokens, mask=batch.mask, prompt_mask=batch.prompt_mask, target_mask=batch.target_mask)
  sb = sweeps.SweepBatch(**shard_rows(fields, mesh), n_prompt=batch.n_prompt)
  small = replicate(dict(layers=np.asarray(layers, np.int32), magnitudes=np.asarray(magnitudes, np.float32),
                         directions=np.asarray(directions, np.float32), refusal_ids=np.asarray(refusal_ids)), mesh)
  out = sweeps.sweep(params, cfg, sb, small["layers"], small["magnitudes"], small["directions"],
                     small["refusal_ids"], **kw)
  return _unpad(out, B, axis_from_end=1)


def pgd_grid(params, cfg: ModelConfig, batch, refusal_ids, layers, radii, key, mesh: Mesh, acfg=None):
  """`lvs_jax.lvs.attack.pgd_grid` with the prompts over "data" -> AttackResult of numpy arrays
  (delta [nL, nR, B, T, D], losses [nL, nR, steps + 1, B], final_loss / loss_success [nL, nR, B])."""
  from lvs_jax.lvs import attack, sweeps

  acfg = acfg or attack.AttackConfig()
  B = batch.tokens.shape[0]
  fields = dict(tokens=batch.tokens, mask=batch.mask, prompt_mask=batch.prompt_mask, target_mask=batch.target_mask)
  sb = sweeps.SweepBatch(**shard_rows(fields, mesh), n_prompt=batch.n_prompt)
  small = replicate(dict(layers=np.asarray(layers, np.int32), radii=np.asarray(radii, np.float32),
                         refusal_ids=np.asarray(refusal_ids)), mesh)
  res = attack.pgd_grid(params, cfg, sb, small["refusal_ids"], small["layers"], small["radii"],
                        replicate_key(key, mesh), acfg)
  return attack.AttackResult(delta=_unpad(res.delta, B, axis=2), losses=_unpad(res.losses, B, axis=3),
                             final_loss=_unpad(res.final_loss, B, axis=2),
                             loss_success=_unpad(res.loss_success, B, axis=2))


def pgd_attack(params, cfg: ModelConfig, batch, refusal_ids, layer: int, eps: float, key, mesh: Mesh, acfg=None):
  """`lvs_jax.lvs.attack.pgd_attack` (one layer, one radius) with the prompts over "data" -> AttackResult
  of numpy arrays (delta [B, T, D], losses [steps + 1, B], final_loss / loss_success [B]). With
  acfg.random_start, a batch padded to the data axis draws its start for the padded shape (other
  numbers than the unpadded single-device run; none when the data axis divides the batch)."""
  from lvs_jax.lvs import attack, sweeps

  acfg = acfg or attack.AttackConfig()
  B = batch.tokens.shape[0]
  fields = dict(tokens=batch.tokens, mask=batch.mask, prompt_mask=batch.prompt_mask, target_mask=batch.target_mask)
  sb = sweeps.SweepBatch(**shard_rows(fields, mesh), n_prompt=batch.n_prompt)
  small = replicate(dict(layer=np.asarray(layer, np.int32), eps=np.asarray(eps, np.float32),
                         refusal_ids=np.asarray(refusal_ids)), mesh)
  res = attack.pgd_attack(params, cfg, sb, small["refusal_ids"], small["layer"], small["eps"],
                          replicate_key(key, mesh), acfg)
  return attack.AttackResult(delta=_unpad(res.delta, B, axis=0), losses=_unpad(res.losses, B, axis=1),
                             final_loss=_unpad(res.final_loss, B, axis=0),
                             loss_success=_unpad(res.loss_success, B, axis=0))


def generate_under_delta(model, params, batch, layer: int, delta, max_new_tokens: int, mesh: Mesh) -> list[str]:
  """`lvs_jax.lvs.attack.generate_under_delta` with the prompts (and the delta's rows) over "data":
  greedy completions of `batch` with delta [B, T, D] added at `layer` on the prompt slots; `params`
  already on the mesh (model.params is not used: it may be a host copy)."""
  from lvs_jax.core import edit as edit_lib
  from lvs_jax.core import generate as gen

  tp = batch.n_prompt
  delta = np.asarray(delta)
  full = np.zeros((delta.shape[0], tp + max_new_tokens, delta.shape[-1]), delta.dtype)
  full[:, :tp] = delta[:, :tp]
  add_layers = np.asarray(edit_lib.layer_mask(model.cfg.n_layers, layer)).astype(full.dtype)
  e = {"resid_pre": edit_lib.SiteEdit(add_shared=shard_rows(full, mesh), add_layers=replicate(add_layers, mesh))}
  out, lengths = generate(params, np.asarray(batch.tokens)[:, :tp], np.asarray(batch.mask)[:, :tp], model.cfg, mesh,
                          max_new_tokens=max_new_tokens, eos_ids=model.tokenizer.eos_ids,
                          pad_id=model.tokenizer.pad_id, edit=e)
  return gen.decode_completions(model.tokenizer, out, lengths)


def on_mesh(params, cfg: ModelConfig, mesh: Mesh, rules=REPLICATED) -> model_lib.Params:
  """`params` as global arrays on `mesh`: returned as they are when every leaf already lives there (a
  loader called with mesh=), else placed by `rules` from their host values (`place_params`)."""
  leaves = jax.tree.leaves(params)
  if all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
         for x in leaves):
    return params
  return place_params(params, cfg, mesh, rules)


def rules_table(name: str) -> dict:
  """A rules table by name: "replicated" | "fsdp" | "tensor" (config field `mesh_rules`)."""
  tables = {"replicated": REPLICATED, "fsdp": FSDP, "tensor": TENSOR}
  if name not in tables:
    raise ValueError(f"mesh rules {name!r}: expected one of {sorted(tables)}")
  return tables[name]


def mesh_from_spec(spec: str | None) -> Mesh | None:
  """A mesh from a config string: None / "" -> None (one device, no mesh); "auto" -> every device on
  "data"; "D" or "DxM" -> a D x M ("data", "model") mesh (D may be 0: all devices // M)."""
  if not spec:
    return None
  if spec == "auto":
    return make_mesh()
  parts = spec.lower().split("x")
  try:
    data, model = (int(parts[0]), int(parts[1]) if len(parts) > 1 else 1)
    if len(parts) > 2:
      raise ValueError
  except ValueError:
    raise ValueError(f"mesh {spec!r}: expected 'auto', 'D' or 'DxM' (data x model devices)") from None
  return make_mesh(data=data or None, model=model)


def replicate_key(key: jax.Array, mesh: Mesh) -> jax.Array:
  """A PRNG key (typed or raw uint32) replicated on the mesh, as a global array on every process."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  data = replicate(np.asarray(jax.random.key_data(key) if typed else key), mesh)
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


@functools.partial(jax.jit, static_argnames=("cfg",))
def _candidate_losses(params, cfg: ModelConfig, tokens, mask, tgt_pos, labels, weights):
  logits = model_lib.forward(params, tokens, cfg, attention_mask=mask, logits_positions=tgt_pos).logits
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  w = weights.astype(jnp.float32)
  return (nll * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)


def candidate_losses(params, cfg: ModelConfig, tokens, mask, tgt_pos, labels, weights, mesh: Mesh) -> np.ndarray:
  """GCG-style batched candidate evaluation with the candidates over "data": mean target cross-entropy
  (nats / token) of each of C full sequences. tokens, mask: [C, T] left-padded prompt + suffix + target;
  tgt_pos [C, Tt]: positions whose logits predict the target `labels` [C, Tt] (weights [C, Tt] 0/1).
  Returns [C] numpy."""
  C = np.shape(tokens)[0]
  x = shard_rows(dict(t=tokens, m=mask, p=tgt_pos, l=labels, w=weights), mesh)
  return _unpad(_candidate_losses(params, cfg, x["t"], x["m"], x["p"], x["l"], x["w"]), C, axis=0)


def generate(params, tokens, attention_mask, cfg: ModelConfig, mesh: Mesh, **kw) -> tuple[np.ndarray, np.ndarray]:
  """`lvs_jax.core.generate.generate_tokens` with the prompts over "data" -> (new_tokens [B, N], lengths
  [B]) as numpy. Greedy decoding (or a fixed key: sampling draws the same numbers on any layout)."""
  from lvs_jax.core import generate as gen

  B = np.shape(tokens)[0]
  x = shard_rows(dict(t=tokens, m=attention_mask), mesh)
  out, lengths = gen.generate_tokens(params, x["t"], x["m"], cfg, **kw)
  return _unpad(out, B, axis=0), _unpad(lengths, B, axis=0)


# ----------------------------------------------------------------------------- sharded training


def state_shardings(state, cfg: ModelConfig, mesh: Mesh, rules=FSDP):
  """NamedShardings of a `lvs_jax.training.core.TrainState` (arrays or ShapeDtypeStructs): full Params
  by `rules`; LoRA adapters replicated (small); every optimizer-state subtree shaped like the trainable
  params (Adam's mu, nu) sharded as those params; scalars, counters and the rng replicated."""
  from lvs_jax.training import lora as lora_lib

  rep = replicated(mesh)
  if isinstance(state.params, lora_lib.LoraParams):
    p_sh = jax.tree.map(lambda _: rep, state.params)
  else:
    p_sh = param_shardings(cfg, mesh, rules)
  p_def = jax.tree.structure(state.params)

  def like_params(node):
    return jax.tree.structure(node) == p_def

  opt_sh = jax.tree.map(lambda n: p_sh if like_params(n) else rep, state.opt_state, is_leaf=like_params)
  return dataclasses.replace(state, step=rep, params=p_sh, opt_state=opt_sh, rng=rep)


def place_state(state, shardings):
  """The TrainState's leaves (host or device values held by every process) put into `shardings`."""
  return jax.tree.map(lambda x, s: distributed.host_to_global(np.asarray(x), s), state, shardings)


def batch_shardings(mesh: Mesh):
  """A `lvs_jax.training.core.Batch` [k, b, T]: the rows b of each micro-batch over "data"."""
  from lvs_jax.training import core as training

  s = NamedSharding(mesh, P(None, "data", None))
  return training.Batch(tokens=s, targets=s, loss_mask=s, segment_ids=s, positions=s)


def make_train_step(cfg: ModelConfig, optimizer, mesh: Mesh, shardings, base: model_lib.Params | None = None,
                    *, schedule=None, compute_dtype=jnp.float32, remat: bool = True):
  """`lvs_jax.training.core.make_train_step` on the mesh: `step(state, batch) -> (state, metrics)` with
  the state laid out by `shardings` (`state_shardings`) and kept there (in_shardings = out_shardings,
  donated), the batch's rows over "data" (a host numpy Batch is placed here, so `train_loop` can drive
  it unchanged), the frozen `base` (LoRA) an argument in its own shardings, metrics replicated.
  Data parallel over rows and FSDP over weights; the same update as one device, up to float rounding."""
  from lvs_jax.training import core as training

  b_sh = batch_shardings(mesh)
  base_sh = None if base is None else jax.tree.map(lambda x: x.sharding, base)
  rep = replicated(mesh)

  def step(state, batch, base):
    inner = training.make_train_step(cfg, optimizer, base, schedule=schedule, compute_dtype=compute_dtype,
                                     remat=remat, donate=False)
    return inner(state, batch)

  jitted = jax.jit(step, in_shardings=(shardings, b_sh, base_sh), out_shardings=(shardings, rep),
                   donate_argnums=(0,))

  def run(state, batch):
    if not isinstance(batch.tokens, jax.Array) or distributed.is_multiprocess():
      batch = jax.tree.map(lambda x, s: distributed.host_to_global(np.asarray(x), s), batch, b_sh)
    return jitted(state, batch, base)

  return run
