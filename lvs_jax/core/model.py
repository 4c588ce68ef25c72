"""A pure-functional Llama-family decoder (Llama-2/3, Mistral, Qwen2, SmolLM2) with edits.

Axis names (defined once, used in every docstring of lvs_jax):
  L  layers                       B  batch (prompts)
  T  query tokens of this call    S  sequence slots: key positions / KV-cache slots
  D  d_model                      F  d_ff (MLP hidden)
  H  query heads                  K  key/value heads (GQA: H = K * G)
  Dh head_dim                     V  vocabulary

Weights are a pytree (`Params`) whose per-layer weights are stacked on a leading L axis and run
with `jax.lax.scan`; an `Edit` (see `lvs_jax.core.edit`) is scanned together with them. Everything
here is a pure function of arrays, so it jits, vmaps (over edits, prompts) and differentiates.

Sequence convention: prompts are left-padded into a buffer of S slots; `attention_mask[b, s]` is 1
for real tokens. RoPE positions count real tokens only (position 0 = first real token), so a
padded prompt gets the same positions, and the same logits, as the prompt alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import edit as edit_lib
from lvs_jax.core.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
  """Per-layer weights, each stacked on a leading L axis. `x @ w` layout (inputs first)."""

  attn_norm: jax.Array  # [L, D]
  wq: jax.Array  # [L, D, H, Dh]
  wk: jax.Array  # [L, D, K, Dh]
  wv: jax.Array  # [L, D, K, Dh]
  wo: jax.Array  # [L, H, Dh, D]
  mlp_norm: jax.Array  # [L, D]
  w_gate: jax.Array  # [L, D, F]
  w_up: jax.Array  # [L, D, F]
  w_down: jax.Array  # [L, F, D]
  bq: jax.Array | None = None  # [L, H, Dh] (Qwen2 only)
  bk: jax.Array | None = None  # [L, K, Dh]
  bv: jax.Array | None = None  # [L, K, Dh]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
  """All weights of the model. `lm_head` is None when the embeddings are tied."""

  embed: jax.Array  # [V, D]
  layers: LayerParams
  final_norm: jax.Array  # [D]
  lm_head: jax.Array | None = None  # [D, V]


# Logical axis names of every weight; a sharding rules table maps them to mesh axes.
LOGICAL_AXES = Params(
  embed=("vocab", "embed"),
  layers=LayerParams(
    attn_norm=("layers", "embed"),
    wq=("layers", "embed", "q_heads", "head_dim"),
    wk=("layers", "embed", "kv_heads", "head_dim"),
    wv=("layers", "embed", "kv_heads", "head_dim"),
    wo=("layers", "q_heads", "head_dim", "embed"),
    mlp_norm=("layers", "embed"),
    w_gate=("layers", "embed", "mlp"),
    w_up=("layers", "embed", "mlp"),
    w_down=("layers", "mlp", "embed"),
    bq=("layers", "q_heads", "head_dim"),
    bk=("layers", "kv_heads", "head_dim"),
    bv=("layers", "kv_heads", "head_dim"),
  ),
  final_norm=("embed",),
  lm_head=("embed", "vocab"),
)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> Params:
  """Shapes and dtypes of every weight as `jax.ShapeDtypeStruct`s (no memory, no FLOPs)."""
  L, D, H, K, Dh, F, V = (
    cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  )
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  bias = cfg.qkv_bias
  return Params(
    embed=s(V, D),
    layers=LayerParams(
      attn_norm=s(L, D), wq=s(L, D, H, Dh), wk=s(L, D, K, Dh), wv=s(L, D, K, Dh),
      wo=s(L, H, Dh, D), mlp_norm=s(L, D), w_gate=s(L, D, F), w_up=s(L, D, F), w_down=s(L, F, D),
      bq=s(L, H, Dh) if bias else None, bk=s(L, K, Dh) if bias else None,
      bv=s(L, K, Dh) if bias else None,
    ),
    final_norm=s(D),
    lm_head=None if cfg.tie_embeddings else s(D, V),
  )


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random weights (normal(0, std); norms = 1 + small noise) for tests and benchmarks."""
  abstract = abstract_params(cfg, dtype)
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(key, len(leaves))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  out = []
  for k, leaf, path in zip(keys, leaves, paths):
    x = jax.random.normal(k, leaf.shape, jnp.float32) * std
    if "norm" in path:
      x = 1.0 + x
    out.append(x.astype(dtype))
  return jax.tree.unflatten(treedef, out)


def check_params(params: Params, cfg: ModelConfig, where: str = "params") -> None:
  """Raises one error naming every weight whose shape does not match `cfg`."""
  want = abstract_params(cfg)
  bad = []
  w_flat = jax.tree_util.tree_flatten_with_path(want)[0]
  p_flat = dict(
    (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  )
  for path, w in w_flat:
    name = jax.tree_util.keystr(path)
    got = p_flat.get(name)
    if got is None:
      bad.append(f"{name}: missing (expected {tuple(w.shape)})")
    elif tuple(got.shape) != tuple(w.shape):
      bad.append(f"{name}: expected shape {tuple(w.shape)}, got {tuple(got.shape)}")
  if bad:
    raise ValueError(f"{where}: weights do not match the config:\n  " + "\n  ".join(bad))


# ----------------------------------------------------------------------------- components


def acc_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype: float32 for bf16/f16/f32 inputs, float64 when running in float64."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32 (float64 for float64 input), cast back to x.dtype before the weight
  (as transformers does)."""
  xf = x.astype(acc_dtype(x.dtype))
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return w * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """[Dh/2] float32 inverse frequencies, with Llama-3 scaling when configured."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  low_wl = rs.original_max_position / rs.low_freq_factor
  high_wl = rs.original_max_position / rs.high_freq_factor
  wavelen = 2 * math.pi / inv
  inv_l = np.where(wavelen > low_wl, inv / rs.factor, inv)
  smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
    rs.high_freq_factor - rs.low_freq_factor
  )
  smoothed = (1 - smooth) * inv_l / rs.factor + smooth * inv_l
  medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
  return np.where(medium, smoothed, inv_l).astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, "rotate half" layout (as transformers). x: [B, T, N, Dh], positions [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def attention_mask_4d(
  q_slots: jax.Array, key_valid: jax.Array, window: int | None
) -> jax.Array:
  """[B, 1, 1, T, S] bool: causal over slots, valid keys only, optional sliding window.

  q_slots: [T] slot index of each query; key_valid: [B, S].
  """
  s = jnp.arange(key_valid.shape[1])
  allowed = s[None, :] <= q_slots[:, None]  # [T, S]
  if window is not None:
    allowed &= q_slots[:, None] - s[None, :] < window
  m = allowed[None] & key_valid[:, None, :].astype(bool)  # [B, T, S]
  return m[:, None, None]


def attend(q, k, v, mask, cfg: ModelConfig) -> jax.Array:
  """GQA attention. q [B,T,H,Dh], k/v [B,S,K,Dh], mask [B,1,1,T,S] -> [B,T,H,Dh]."""
  q = einops.rearrange(q, "b t (k g) d -> b k g t d", k=cfg.n_kv_heads)
  acc = acc_dtype(q.dtype)
  scores = jnp.einsum("bkgtd,bskd->bkgts", q, k, preferred_element_type=acc)
  scores = scores * (cfg.head_dim**-0.5)
  scores = jnp.where(mask, scores, jnp.finfo(acc).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->bkgtd", probs, v)
  return einops.rearrange(out, "b k g t d -> b t (k g) d")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values for every layer and slot. k, v: [L, B, S, K, Dh]; valid: [B, S] (0 = pad/empty)."""

  k: jax.Array
  v: jax.Array
  valid: jax.Array


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
  shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
  """logits: [B, T, V] float32. captured: site -> [L, B, P, D] (P = T or len(capture_positions)).
  cache: the updated KVCache when one was passed in."""

  logits: jax.Array
  captured: dict
  cache: KVCache | None = None


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions [B, S] for left- (or right-) padded rows: index among real tokens."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _capture(h, positions_idx):
  if positions_idx is None:
    return h
  return jnp.take_along_axis(h, positions_idx[..., None], axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
  """What every layer of one call shares: RoPE positions [B, T], the attention mask
  [B, 1, 1, T, S] (see attention_mask_4d) and the first slot `start` of the call's tokens."""

  positions: jax.Array
  mask: jax.Array
  start: jax.Array | int = 0


def context(attention_mask: jax.Array, cfg: ModelConfig) -> Context:
  """The Context of a cache-free call on a [B, T] batch (slots 0..T-1)."""
  attention_mask = attention_mask.astype(jnp.int32)
  T = attention_mask.shape[1]
  return Context(positions_from_mask(attention_mask), attention_mask_4d(jnp.arange(T), attention_mask,
                                                                         cfg.sliding_window), 0)


def embed(params: Params, tokens: jax.Array) -> jax.Array:
  """Token embeddings [B, T, D] in the params' dtype."""
  return params.embed[tokens].astype(params.embed.dtype)


def unembed(params: Params, h: jax.Array, cfg: ModelConfig, logits_positions: jax.Array | None = None) -> jax.Array:
  """Final norm and LM head: h [B, T, D] -> logits [B, T, V] (or [B, P, V] at logits_positions), float32
  (float64 when the params are float64)."""
  if logits_positions is not None:
    h = jnp.take_along_axis(h, logits_positions[..., None], axis=1)
  h = rms_norm(h, params.final_norm, cfg.rms_eps)
  head = params.embed.T if params.lm_head is None else params.lm_head
  return jnp.einsum("btd,dv->btv", h, head, preferred_element_type=acc_dtype(h.dtype))


def linear(x: jax.Array, w: jax.Array, lora: tuple[jax.Array, jax.Array] | None = None,
           spec: str | None = None) -> jax.Array:
  """x [B, T, *in] @ w [*in, *out] -> [B, T, *out] (`spec`: the einsum; default `x @ w` for 2-D w).

  lora = (a [I, r], b [r, O]) adds the low-rank term (x @ a) @ b *unmerged* (I, O: products of the in
  and out axes; the LoRA scale is folded into b): the base product and the low-rank term are summed
  in float32 and rounded to x.dtype once, so an update far below the bfloat16 spacing of W still
  moves the output (merging W + a @ b in bfloat16 would round it away), and no merged copy of W
  is built.
  """
  if lora is None:
    return x @ w if spec is None else jnp.einsum(spec, x, w)
  a, b = lora
  acc = acc_dtype(x.dtype)
  if spec is None:
    y = jnp.matmul(x, w, preferred_element_type=acc)
  else:
    y = jnp.einsum(spec, x, w, preferred_element_type=acc)
  xi = x.reshape(*x.shape[:2], a.shape[0])
  low = jnp.einsum("bti,ir->btr", xi, a.astype(x.dtype), preferred_element_type=acc)
  low = jnp.einsum("btr,ro->bto", low, b.astype(acc))
  return (y + low.reshape(y.shape)).astype(x.dtype)


def block(
  cfg: ModelConfig,
  ctx: Context,
  h: jax.Array,
  lp: LayerParams,
  le: dict | None = None,
  ck: jax.Array | None = None,
  cv: jax.Array | None = None,
  *,
  capture: Sequence[str] = (),
  capture_positions: jax.Array | None = None,
  lora: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
):
  """One transformer block on h [B, T, D] with this layer's weights `lp` (no L axis) and edit slice.

  ck, cv: this layer's KV cache [B, S, K, Dh] (None: attend to this call's tokens only).
  lora: this layer's low-rank adapters (see `linear`), keyed by LayerParams field name.
  Returns (h, captured {site: [B, P, D]}, ck, cv).
  """
  le = le or {}
  lora = lora or {}
  out = {}
  dtype = h.dtype

  def site(name, x):
    x = edit_lib.apply_site(x, le.get(name), ctx.start)
    if name in capture:
      out[name] = _capture(x, capture_positions)
    return x

  inv_freq = rope_inv_freq(cfg)
  h = site("resid_pre", h)
  x = rms_norm(h, lp.attn_norm, cfg.rms_eps)
  q = linear(x, lp.wq, lora.get("wq"), "btd,dhk->bthk")
  k = linear(x, lp.wk, lora.get("wk"), "btd,dhk->bthk")
  v = linear(x, lp.wv, lora.get("wv"), "btd,dhk->bthk")
  if lp.bq is not None:
    q, k, v = q + lp.bq, k + lp.bk, v + lp.bv
  q = rope(q, ctx.positions, inv_freq)
  k = rope(k, ctx.positions, inv_freq)
  if ck is not None:
    ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), ctx.start, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), ctx.start, axis=1)
    k_all, v_all = ck.astype(dtype), cv.astype(dtype)
  else:
    k_all, v_all = k, v
  a = attend(q, k_all, v_all, ctx.mask, cfg)
  a = linear(a, lp.wo, lora.get("wo"), "bthk,hkd->btd")
  h = h + site("attn_out", a)
  x = rms_norm(h, lp.mlp_norm, cfg.rms_eps)
  m = jax.nn.silu(linear(x, lp.w_gate, lora.get("w_gate"))) * linear(x, lp.w_up, lora.get("w_up"))
  h = h + site("mlp_out", linear(m, lp.w_down, lora.get("w_down")))
  h = site("resid_post", h)
  return h, out, ck, cv


def scan_layers(
  layers: LayerParams,
  h: jax.Array,
  cfg: ModelConfig,
  ctx: Context,
  *,
  edit: edit_lib.Edit | None = None,
  kv: tuple[jax.Array, jax.Array] | None = None,
  lora: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
  capture: Sequence[str] = (),
  capture_positions: jax.Array | None = None,
  from_layer: jax.Array | int | None = None,
  remat: bool = False,
):
  """The layer loop every forward shares (`forward`, `run_from_layer`, training's `forward_train`):
  a `lax.scan` of `block` over the stacked weights, with every per-layer argument sliced per layer.

  h: [B, T, D] entering layer 0 (or `from_layer`). edit: an Edit (leaves [L, ...]). kv: the KV cache
  (k, v), each [L, B, S, K, Dh]. lora: LayerParams field -> (a [L, I, r], b [L, r, O]) adapters run
  unmerged (`linear`). from_layer: blocks < from_layer are skipped (h passes through; their captures
  are zeros) by a `lax.cond` per layer, a real skip when from_layer is unbatched (under lax.map), a
  select when vmapped. remat: recompute each block in the backward pass (`jax.checkpoint`).
  Returns (h [B, T, D], captured {site: [L, B, P, D]}, kv or None).
  """
  ck, cv = (None, None) if kv is None else kv
  idx = None if from_layer is None else jnp.arange(cfg.n_layers, dtype=jnp.int32)
  edit, shared = edit_lib.shared_leaves(edit)  # leaves without an L axis are closed over, not scanned

  def body(h, xs):
    i, lp, le, lo, ck, cv = xs
    le = edit_lib.with_shared(le, shared)

    def run(h):
      return block(cfg, ctx, h, lp, le, ck, cv, capture=capture, capture_positions=capture_positions, lora=lo)

    def skip(h):
      captured = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, h)[1])
      return h, captured, ck, cv

    if i is None:
      h, out, ck, cv = run(h)
    else:
      h, out, ck, cv = jax.lax.cond(i >= jnp.asarray(from_layer, i.dtype), run, skip, h)
    return h, (out, ck, cv)

  if remat:
    body = jax.checkpoint(body)
  h, (captured, ck, cv) = jax.lax.scan(body, h, (idx, layers, edit, lora, ck, cv))
  return h, captured, None if kv is None else (ck, cv)


def forward(
  params: Params,
  tokens: jax.Array,
  cfg: ModelConfig,
  *,
  attention_mask: jax.Array | None = None,
  edit: edit_lib.Edit | None = None,
  capture: Sequence[str] = (),
  capture_positions: jax.Array | None = None,
  capture_layers: Sequence[int] | None = None,
  cache: KVCache | None = None,
  start: jax.Array | int = 0,
  positions: jax.Array | None = None,
  logits_positions: jax.Array | None = None,
  remat: bool = False,
) -> Output:
  """Runs the model on tokens [B, T], applying `edit` and recording the `capture` sites.

  Without a cache the T tokens are the whole sequence (slots 0..T-1) and `attention_mask` [B, T]
  marks real tokens (default: all). With a cache, the tokens fill slots [start, start+T) of it,
  `attention_mask` [B, T] marks which of them are real, and `positions` [B, T] gives their RoPE
  positions (default: derived from the cache's valid slots). capture_positions: [B, P] slot
  indices (relative to this call's tokens) to keep, instead of all T. capture_layers: keep only these
  layers (in this order) on the captured L axis. logits_positions: [B, P]
  token indices whose logits to compute (default all T) -- e.g. only the last one.
  """
  B, T = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((B, T), jnp.int32)
  attention_mask = attention_mask.astype(jnp.int32)
  for site in capture:
    if site not in edit_lib.SITES:
      raise ValueError(f"unknown capture site {site!r}; expected one of {edit_lib.SITES}")
  if edit is not None:
    edit_lib.validate(edit, cfg.n_layers)

  if cache is None:
    key_valid = attention_mask
    if positions is None:
      positions = positions_from_mask(attention_mask)
  else:
    key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, start, axis=1)
    if positions is None:
      before = jnp.sum(
        cache.valid * (jnp.arange(cache.valid.shape[1]) < start)[None].astype(jnp.int32), axis=1,
        keepdims=True,
      )
      positions = before + positions_from_mask(attention_mask)
  ctx = Context(
    positions=positions, mask=attention_mask_4d(start + jnp.arange(T), key_valid, cfg.sliding_window), start=start
  )
  kv = None if cache is None else (cache.k, cache.v)
  h, captured, kv = scan_layers(params.layers, embed(params, tokens), cfg, ctx, edit=edit, kv=kv, capture=capture,
                                capture_positions=capture_positions, remat=remat)
  if capture_layers is not None:
    idx = np.asarray(capture_layers, np.int32)
    if idx.size and (idx.min() < 0 or idx.max() >= cfg.n_layers):
      raise ValueError(f"capture_layers {list(capture_layers)} out of range for {cfg.n_layers} layers")
    captured = {k: v[idx] for k, v in captured.items()}
  logits = unembed(params, h, cfg, logits_positions)
  new_cache = None if cache is None else KVCache(*kv, key_valid)
  return Output(logits=logits, captured=captured, cache=new_cache)
