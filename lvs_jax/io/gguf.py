"""Loading llama.cpp GGUF checkpoints into lvs_jax `Params` (Llama, Qwen2, Mistral; SmolLM2 is Llama).

Layouts, once. A GGUF tensor lists its dims innermost first (`ne0` = the contiguous axis), so
`ReaderTensor.shape` is the reverse of the numpy shape; for a 2D weight `ne = (in, out)` and
`gguf.quants.dequantize` returns numpy `[out, in]` -- the torch `nn.Linear` layout. lvs_jax stores
weights as `x @ w` (`[in, out]`, heads split out), so every matrix is transposed here.

llama.cpp's converter permutes the rows of `attn_q` / `attn_k` for Llama-family models so that its
RoPE can rotate adjacent pairs (GPT-J style); transformers and lvs_jax rotate halves (GPT-NeoX
style). `unpermute_qk_rows` undoes that exactly as transformers does (`LlamaTensorProcessor`).
Qwen2 files are not permuted.

Quantized tensors are dequantized with `gguf.quants.dequantize` (no hand-written kernels) to float32
and then cast to the requested dtype.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from lvs_jax.core.config import ConfigError, ModelConfig, RopeScaling
from lvs_jax.core.model import Params, check_params
from lvs_jax.core.tokenizer import LoadedModel, Tokenizer
from lvs_jax.io import layout

Q = gguf.GGMLQuantizationType

# Explicit allow-list: types whose gguf-py numpy dequantizer we rely on (and the tests cover).
SUPPORTED_TYPES: tuple[gguf.GGMLQuantizationType, ...] = (
  Q.F32,
  Q.F16,
  Q.BF16,
  Q.Q8_0,
  Q.Q4_0,
  Q.Q4_1,
  Q.Q5_0,
  Q.Q5_1,
  Q.Q2_K,
  Q.Q3_K,
  Q.Q4_K,
  Q.Q5_K,
  Q.Q6_K,
)


@dataclasses.dataclass(frozen=True)
class _ArchSpec:
  config_arch: str  # ModelConfig.arch
  permuted_qk: bool  # llama.cpp permuted attn_q / attn_k rows for its RoPE layout
  qkv_bias: bool


# GGUF `general.architecture` -> how to read it. llama.cpp writes Mistral-7B style models as
# "llama"; a file that says "mistral" is read the same way (Llama layout, permuted q/k).
ARCHS: dict[str, _ArchSpec] = {
  "llama": _ArchSpec("llama", permuted_qk=True, qkv_bias=False),
  "mistral": _ArchSpec("mistral", permuted_qk=True, qkv_bias=False),
  "qwen2": _ArchSpec("qwen2", permuted_qk=False, qkv_bias=True),
}

# Tensors a supported file may hold that do not become weights (`rope_freqs` is read into the config).
_IGNORED_TENSORS = ("rope_freqs.weight",)


class GGUFError(ValueError):
  """A GGUF file is unreadable, or holds tensors lvs_jax cannot load."""


@dataclasses.dataclass
class GGUFFile:
  """An opened GGUF file: metadata (lazily parsed) and tensors (memory-mapped, not yet dequantized)."""

  path: str
  reader: Any  # gguf.GGUFReader
  tensors: dict[str, Any]  # name -> gguf ReaderTensor

  @property
  def arch(self) -> str:
    return str(self.get("general.architecture", ""))

  def has(self, key: str) -> bool:
    return key in self.reader.fields

  def get(self, key: str, default: Any = None) -> Any:
    """The value of metadata `key` (str, number, or list), `default` when absent."""
    field = self.reader.fields.get(key)
    if field is None:
      return default
    return field.contents()

  def array_len(self, key: str) -> int | None:
    """Length of an array-valued metadata key without decoding it (e.g. 49152 token strings)."""
    field = self.reader.fields.get(key)
    return None if field is None else len(field.data)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
  """Opens a GGUF file and checks that every tensor's type can be dequantized.

  Raises FileNotFoundError (missing path) or GGUFError (not a GGUF file, truncated, unsupported
  tensor type), each naming the path.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such GGUF file")
  if os.path.isdir(path):
    raise GGUFError(f"{path}: is a directory, not a GGUF file")
  try:
    reader = gguf.GGUFReader(path, "r")
  except Exception as e:  # gguf-py raises ValueError, IndexError, KeyError, ... on corrupt input.
    raise GGUFError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from e
  tensors = {t.name: t for t in reader.tensors}
  bad = [t for t in reader.tensors if t.tensor_type not in SUPPORTED_TYPES]
  if bad:
    supported = ", ".join(t.name for t in SUPPORTED_TYPES)
    listed = "; ".join(f"tensor {t.name!r} has type {t.tensor_type.name}" for t in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    raise GGUFError(f"{path}: unsupported quantization type: {listed}{more}. Supported types: {supported}")
  return GGUFFile(path=path, reader=reader, tensors=tensors)


def dequantize(tensor: Any, path: str = "<gguf>") -> np.ndarray:
  """A GGUF tensor as float32 numpy in its numpy order: the reverse of `tensor.shape` (ne).

  For a 2D weight with ne = (in, out) this is `[out, in]`.
  """
  if tensor.tensor_type not in SUPPORTED_TYPES:
    raise GGUFError(f"{path}: tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}")
  shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  try:
    out = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    out = np.asarray(out, np.float32).reshape(shape)
  except (ValueError, TypeError) as e:
    raise GGUFError(
      f"{path}: cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}, ne={shape[::-1]}): {e}"
    ) from e
  return out


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation. w: [n_head * Dh, ...] (torch layout) -> same shape.

  llama.cpp (`convert_hf_to_gguf.py`, `LlamaModel.permute`) stores the rows of each head as
  `reshape(n_head, 2, Dh/2, ...).swapaxes(1, 2)`; this is transformers' `_reverse_permute_weights`.
  For attn_k, n_head is the number of KV heads.
  """
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (the inverse of `unpermute_qk_rows`), used to write test files."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- config


def _llama3_factors(inv_freq: np.ndarray, rs: RopeScaling) -> np.ndarray:
  """The divisors llama.cpp stores in `rope_freqs.weight` for Llama-3 scaling."""
  wavelen = 2 * math.pi / inv_freq
  low_wl = rs.original_max_position / rs.low_freq_factor
  high_wl = rs.original_max_position / rs.high_freq_factor
  smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
    rs.high_freq_factor - rs.low_freq_factor
  )
  mid = 1.0 / ((1 - smooth) / rs.factor + smooth)
  return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, rs.factor, mid))


def _rope_scaling_from_factors(
  gf: GGUFFile, factors: np.ndarray, theta: float, head_dim: int, max_position: int
) -> RopeScaling | None:
  """Recovers Llama-3 RoPE scaling parameters from llama.cpp's `rope_freqs` divisors [Dh/2].

  The factors only pin down orig/(high-low) and low/(high-low) (from the smoothly interpolated
  band), so high - low is set to 1; any choice gives the same frequencies, which is checked.
  """
  dim = head_dim
  inv = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float64)
  factors = factors.astype(np.float64)
  if factors.shape != inv.shape:
    raise ConfigError(f"{gf.path}: rope_freqs.weight has shape {factors.shape}, expected {inv.shape}")
  if np.allclose(factors, 1.0):
    return None
  factor = float(factors.max())
  wavelen = 2 * math.pi / inv
  unscaled = np.isclose(factors, 1.0, rtol=1e-5)
  scaled = np.isclose(factors, factor, rtol=1e-5)
  mid = ~unscaled & ~scaled
  if mid.sum() >= 2:
    # 1/f = (1 - s)/factor + s  =>  s = (1/f - 1/factor) / (1 - 1/factor), and s = a/wavelen - b.
    s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    a, minus_b = np.polyfit(1.0 / wavelen[mid], s, 1)
    # With high - low = 1: orig = a, low = b. RopeScaling wants an integer orig, so scale all three.
    k = max(1.0, round(float(a))) / float(a)
    rs = RopeScaling(
      factor=factor,
      low_freq_factor=float(-minus_b * k),
      high_freq_factor=float((1.0 - minus_b) * k),
      original_max_position=int(round(float(a) * k)),
    )
  elif mid.sum() == 0 and unscaled.any() and scaled.any():
    # A hard cut-over: any thresholds between the last unscaled and first scaled wavelength.
    orig = max_position
    high_wl = wavelen[unscaled].max() * (1 + 1e-4)
    low_wl = wavelen[scaled].min() * (1 - 1e-4)
    rs = RopeScaling(
      factor=factor,
      low_freq_factor=orig / low_wl,
      high_freq_factor=orig / high_wl,
      original_max_position=orig,
    )
  else:
    raise ConfigError(f"{gf.path}: cannot express rope_freqs.weight as Llama-3 RoPE scaling")
  got = _llama3_factors(inv, rs)
  if not np.allclose(got, factors, rtol=1e-4, atol=1e-6):
    raise ConfigError(f"{gf.path}: rope_freqs.weight is not Llama-3 style RoPE scaling")
  return rs


def _rope_scaling(gf: GGUFFile, arch: str, theta: float, head_dim: int, max_position: int):
  kind = gf.get(f"{arch}.rope.scaling.type")
  if kind not in (None, "none", "llama3"):
    raise ConfigError(f"{gf.path}: unsupported RoPE scaling type {kind!r}; supported: none, llama3")
  keys = {
    k: gf.get(f"{arch}.rope.scaling.{k}")
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
  }
  if kind == "llama3" or all(v is not None for v in keys.values()):
    missing = [k for k, v in keys.items() if v is None]
    if missing:
      raise ConfigError(f"{gf.path}: llama3 RoPE scaling is missing keys {missing}")
    return RopeScaling(
      factor=float(keys["factor"]),
      low_freq_factor=float(keys["low_freq_factor"]),
      high_freq_factor=float(keys["high_freq_factor"]),
      original_max_position=int(keys["original_context_length"]),
    )
  if "rope_freqs.weight" in gf.tensors:
    factors = dequantize(gf.tensors["rope_freqs.weight"], gf.path).reshape(-1)
    return _rope_scaling_from_factors(gf, factors, theta, head_dim, max_position)
  return None


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
  """Builds the `ModelConfig` from GGUF metadata (`{arch}.*` keys) and the tensor list."""
  arch = gf.arch
  if arch not in ARCHS:
    raise ConfigError(f"{gf.path}: unsupported GGUF architecture {arch!r}; supported: {sorted(ARCHS)}")
  spec = ARCHS[arch]
  required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
  missing = [f"{arch}.{k}" for k in required if not gf.has(f"{arch}.{k}")]
  if missing:
    raise ConfigError(f"{gf.path}: GGUF metadata is missing {missing}")

  def num(key, default=None):
    v = gf.get(f"{arch}.{key}", default)
    if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv) are not supported
      if len(set(v)) != 1:
        raise ConfigError(f"{gf.path}: per-layer {arch}.{key}={v} is not supported")
      v = v[0]
    if isinstance(v, float):
      # float32 metadata: take the shortest decimal that round-trips (9.99999975e-06 -> 1e-05), the
      # value the converter was given.
      v = float(np.format_float_positional(np.float32(v), unique=True, trim="-"))
    return v

  d_model = int(num("embedding_length"))
  n_heads = int(num("attention.head_count"))
  n_kv = int(num("attention.head_count_kv", n_heads))
  head_dim = int(num("attention.key_length", d_model // n_heads))
  rope_dim = num("rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != head_dim:
    raise ConfigError(
      f"{gf.path}: {arch}.rope.dimension_count={rope_dim} != head_dim={head_dim} (partial RoPE unsupported)"
    )
  vocab = num("vocab_size") or gf.array_len("tokenizer.ggml.tokens")
  if not vocab and "token_embd.weight" in gf.tensors:
    vocab = int(gf.tensors["token_embd.weight"].shape[1])
  if not vocab:
    raise ConfigError(
      f"{gf.path}: cannot tell the vocabulary size ({arch}.vocab_size, tokenizer.ggml.tokens)"
    )
  theta = float(num("rope.freq_base", 10000.0))
  max_position = int(num("context_length", 4096))
  sliding = num("attention.sliding_window")
  return ModelConfig(
    arch=spec.config_arch,
    vocab_size=int(vocab),
    d_model=d_model,
    n_layers=int(num("block_count")),
    n_heads=n_heads,
    n_kv_heads=n_kv,
    head_dim=head_dim,
    d_ff=int(num("feed_forward_length")),
    rms_eps=float(num("attention.layer_norm_rms_epsilon", 1e-5)),
    rope_theta=theta,
    rope_scaling=_rope_scaling(gf, arch, theta, head_dim, max_position),
    tie_embeddings="output.weight" not in gf.tensors,
    qkv_bias=spec.qkv_bias,
    sliding_window=int(sliding) if sliding else None,
    max_position=max_position,
  )


# ----------------------------------------------------------------------------- weights


# GGUF tensor names -> (Params field, n_in); see `lvs_jax.io.layout` (GGUF `ne` is the reverse of the
# torch shape, `dequantize` returns the torch layout).
GGUF_TOP: layout.Table = {"token_embd.weight": ("embed", None), "output_norm.weight": ("final_norm", 0),
                          "output.weight": ("lm_head", 1)}
GGUF_LAYER: layout.Table = {
  "attn_norm.weight": ("attn_norm", 0), "attn_q.weight": ("wq", 1), "attn_k.weight": ("wk", 1),
  "attn_v.weight": ("wv", 1), "attn_output.weight": ("wo", 2), "ffn_norm.weight": ("mlp_norm", 0),
  "ffn_gate.weight": ("w_gate", 1), "ffn_up.weight": ("w_up", 1), "ffn_down.weight": ("w_down", 1),
  "attn_q.bias": ("bq", 0), "attn_k.bias": ("bk", 0), "attn_v.bias": ("bv", 0),
}


def _gguf_prefix(i: int) -> str:
  return f"blk.{i}."


def expected_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """GGUF tensor name -> numpy shape (torch layout, reverse of ne) that `cfg` implies (from `abstract_params`)."""
  return layout.expected_shapes(cfg, GGUF_TOP, GGUF_LAYER, _gguf_prefix)


def _check_tensors(gf: GGUFFile, cfg: ModelConfig) -> None:
  """One error listing every missing, unexpected or mis-shaped tensor, before any dequantization."""
  want = expected_tensor_shapes(cfg)
  problems = []
  for name, shape in want.items():
    t = gf.tensors.get(name)
    if t is None:
      problems.append(f"{name}: missing (expected shape {shape})")
      continue
    got = tuple(int(n) for n in reversed(t.shape.tolist()))
    if got != shape:
      problems.append(f"{name}: expected shape {shape} from the metadata, got {got}")
  extra = sorted(set(gf.tensors) - set(want) - set(_IGNORED_TENSORS))
  if extra:
    problems.append(f"unexpected tensors for arch {gf.arch!r}: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
  if problems:
    raise GGUFError(f"{gf.path}: tensors do not match the config:\n  " + "\n  ".join(problems))


def params_from_gguf(gf: GGUFFile, cfg: ModelConfig, dtype=jnp.float32, *, host: bool = False, mesh=None,
                     rules=None) -> Params:
  """Dequantizes every weight into stacked `Params` (`x @ w` layout) of `dtype`. host=True: numpy leaves
  in host memory; mesh: each weight placed straight into its shards by `rules` (see `hf.load_hf_params`)."""
  _check_tensors(gf, cfg)
  # llama.cpp permutes the q/k rows of Llama-family checkpoints: heads per permuted tensor.
  heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads} if ARCHS[gf.arch].permuted_qk else {}

  def get(name):
    w = dequantize(gf.tensors[name], gf.path)
    parts = name.split(".")
    n = heads.get(parts[2]) if parts[0] == "blk" else None
    return w if n is None else unpermute_qk_rows(w, n)

  params = layout.read_params(cfg, dtype, GGUF_TOP, GGUF_LAYER, _gguf_prefix, get, host=host or mesh is not None)
  check_params(params, cfg, where=gf.path)
  return layout.place(params, cfg, mesh, rules)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_from_gguf(gf: GGUFFile) -> Tokenizer:
  """The tokenizer described by the GGUF metadata, built offline with the `tokenizers` library (no
  torch; see `lvs_jax.io.gguf_tokenizer`), wrapped."""
  from lvs_jax.io import gguf_tokenizer
  from lvs_jax.io.hf import wrap_tokenizer

  if not gf.has("tokenizer.ggml.tokens"):
    raise GGUFError(f"{gf.path}: no tokenizer metadata (tokenizer.ggml.tokens); load with tokenizer=False")
  meta = gguf_tokenizer.read_tokenizer_metadata(gf)
  try:
    hf = gguf_tokenizer.tokenizer_from_metadata(meta, where=gf.path)
  except gguf_tokenizer.TokenizerMetadataError as e:
    raise GGUFError(str(e)) from e
  eos, pad = meta.get("eos_token_id"), meta.get("padding_token_id")
  return wrap_tokenizer(hf, chat_template=meta.get("chat_template"), eos_ids=() if eos is None else (int(eos),),
                        pad_id=pad)


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, *, tokenizer: bool = True, host: bool = False,
              mesh=None, rules=None) -> LoadedModel:
  """Loads config, dequantized weights (`dtype`: float32 or bfloat16) and tokenizer from a GGUF file.
  host / mesh / rules: where the weights go (`params_from_gguf`)."""
  gf = read_gguf(path)
  cfg = config_from_gguf(gf)
  params = params_from_gguf(gf, cfg, dtype, host=host, mesh=mesh, rules=rules)
  tok = tokenizer_from_gguf(gf) if tokenizer else None
  name = gf.get("general.name") or os.path.basename(gf.path)
  return LoadedModel(cfg=cfg, params=params, tokenizer=tok, source=gf.path, name=str(name))
