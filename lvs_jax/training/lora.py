"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the stacked Params.

A LoRA adapter of a weight W (any of the seven linear maps of a block, `MODULES`) is a pair
  a: [L, I, r]   b: [L, r, O]        W' = W + (alpha / r) * (a @ b), reshaped to W's shape,
where I is the product of W's input axes and O of its output axes (`lvs_jax.core.model` stores weights
`x @ w`, inputs first: wq [L, D, H, Dh] has I = D, O = H*Dh; wo [L, H, Dh, D] has I = H*Dh, O = D).
Like the weights, the adapters are stacked on the leading layer axis L.

Training runs the adapters *unmerged*: `adapters(lora)` hands them to the model's layer loop
(`lvs_jax.core.model.scan_layers` / `linear`), which computes x @ W + s (x @ a) @ b with both terms
summed in float32. Merging W + s a @ b in W's dtype every step would build a full extra copy of each
adapted weight and, with bfloat16 weights, round away every update below ~2^-8 |W| while gradients
still flow. `merge(base, lora) -> Params` forms the adapted weights explicitly, for export and for
evaluation code that takes plain Params. With b = 0 (the initialization, as in the paper and PEFT)
every delta is exactly zero and `merge` returns W + 0 = W bit for bit.

Initialization follows PEFT's default: a ~ U(-1/sqrt(I), 1/sqrt(I)) (kaiming-uniform with a=sqrt(5)),
b = 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lvs_jax.core.config import ModelConfig
from lvs_jax.core.model import Params, abstract_params

# Module name -> (LayerParams field, number of input axes after L).
MODULES: dict[str, tuple[str, int]] = {
  "q": ("wq", 1),
  "k": ("wk", 1),
  "v": ("wv", 1),
  "o": ("wo", 2),
  "gate": ("w_gate", 1),
  "up": ("w_up", 1),
  "down": ("w_down", 1),
}
ALL_MODULES: tuple[str, ...] = tuple(MODULES)
ATTENTION_MODULES: tuple[str, ...] = ("q", "k", "v", "o")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights:
  """One adapted module, every layer: a [L, I, r], b [L, r, O]."""

  a: jax.Array
  b: jax.Array


@dataclasses.dataclass(frozen=True)
class LoraParams:
  """Adapters for a subset of MODULES. `scale` = alpha / rank is static (not trained, not a leaf)."""

  weights: dict[str, LoraWeights]
  scale: float

  @property
  def rank(self) -> int:
    return next(iter(self.weights.values())).a.shape[-1]

  @property
  def modules(self) -> tuple[str, ...]:
    """Adapted modules in MODULES order (pytree dicts sort their keys, so `weights` may not)."""
    return tuple(m for m in MODULES if m in self.weights)


jax.tree_util.register_dataclass(LoraParams, data_fields=["weights"], meta_fields=["scale"])


def _io(shape: Sequence[int], n_in: int) -> tuple[int, int]:
  """(I, O) of a stacked weight shape [L, *in, *out]."""
  return math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])


def check_modules(modules: Sequence[str]) -> tuple[str, ...]:
  if isinstance(modules, str):
    modules = (modules,)
  modules = tuple(dict.fromkeys(modules))
  bad = [m for m in modules if m not in MODULES]
  if bad or not modules:
    raise ValueError(f"LoRA target modules {list(modules)}: unknown {bad}; choose among {ALL_MODULES}")
  return modules


def abstract_lora(cfg: ModelConfig, rank: int, alpha: float, modules: Sequence[str] = ALL_MODULES,
                  dtype=jnp.float32) -> LoraParams:
  """Shapes of the adapters as `jax.ShapeDtypeStruct`s (for restoring checkpoints)."""
  modules = check_modules(modules)
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  base = abstract_params(cfg)
  L = cfg.n_layers
  weights = {}
  for m in modules:
    field, n_in = MODULES[m]
    i, o = _io(getattr(base.layers, field).shape, n_in)
    weights[m] = LoraWeights(jax.ShapeDtypeStruct((L, i, rank), dtype), jax.ShapeDtypeStruct((L, rank, o), dtype))
  return LoraParams(weights, float(alpha) / rank)


def init(key: jax.Array, cfg: ModelConfig, rank: int, alpha: float, modules: Sequence[str] = ALL_MODULES,
         dtype=jnp.float32) -> LoraParams:
  """Fresh adapters: a ~ U(-1/sqrt(I), 1/sqrt(I)), b = 0 (so the adapted model equals the base)."""
  abstract = abstract_lora(cfg, rank, alpha, modules, dtype)
  return _init(key, abstract)


@jax.jit
def _init(key: jax.Array, abstract: LoraParams) -> LoraParams:
  # One uniform draw for every module, cut into pieces: one small compiled function.
  sizes = [math.prod(w.a.shape) for w in abstract.weights.values()]
  u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  weights, start = {}, 0
  for size, (m, w) in zip(sizes, abstract.weights.items()):
    a = u[start:start + size].reshape(w.a.shape) / math.sqrt(w.a.shape[1])
    weights[m] = LoraWeights(a.astype(w.a.dtype), jnp.zeros(w.b.shape, w.b.dtype))
    start += size
  return LoraParams(weights, abstract.scale)


def delta(w: LoraWeights, scale: float, shape: Sequence[int]) -> jax.Array:
  """(alpha / r) * a @ b, reshaped to the adapted weight's `shape` [L, *in, *out]; float32 accumulation."""
  d = jnp.einsum("lir,lro->lio", w.a, w.b, preferred_element_type=jnp.float32) * scale
  return d.reshape(tuple(shape))


def adapters(lora: LoraParams) -> dict[str, tuple[jax.Array, jax.Array]]:
  """LayerParams field -> (a [L, I, r], (alpha / r) * b [L, r, O]): the form `lvs_jax.core.model.scan_layers`
  runs unmerged."""
  return {MODULES[m][0]: (w.a, w.b * jnp.asarray(lora.scale, w.b.dtype)) for m, w in lora.weights.items()}


def merge(base: Params, lora: LoraParams | None) -> Params:
  """The adapted weights W + (alpha / r) a @ b for every adapted module, in W's dtype: for export and
  for code that takes plain Params (training runs the adapters unmerged, see `adapters`)."""
  if lora is None:
    return base
  updates = {}
  for m, w in lora.weights.items():
    field, _ = MODULES[m]
    W = getattr(base.layers, field)
    updates[field] = W + delta(w, lora.scale, W.shape).astype(W.dtype)
  return dataclasses.replace(base, layers=dataclasses.replace(base.layers, **updates))



def num_params(tree) -> int:
  """Number of scalars in a pytree of arrays (adapters, Params, ...)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
