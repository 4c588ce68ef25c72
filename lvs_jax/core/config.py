"""Model configuration for the Llama family (Llama-2/3, Mistral, Qwen2, SmolLM2).

`ModelConfig` is a frozen, hashable dataclass so it can be a static argument of `jax.jit`.
It is built from a Hugging Face `config.json` (`from_hf_dict`) or from GGUF metadata
(`lvs_jax.io.gguf`), and converted back to an HF dict (`to_hf_dict`) for reference tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


class ConfigError(ValueError):
  """A model configuration is missing a field or holds an unsupported value."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style RoPE frequency scaling (`rope_type == "llama3"` in HF configs)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and hyper-parameters of a decoder-only Llama-family transformer.

  Axis names used throughout lvs_jax: L layers, B batch, T tokens (query positions),
  S sequence slots (key positions / KV-cache slots), D = d_model, H query heads,
  K key/value heads, Dh = head_dim, F = d_ff, V = vocab_size.
  """

  arch: str = "llama"
  vocab_size: int = 32000
  d_model: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 32
  head_dim: int = 128
  d_ff: int = 11008
  rms_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False
  sliding_window: int | None = None
  max_position: int = 4096

  def __post_init__(self):
    if self.arch not in SUPPORTED_ARCHS:
      raise ConfigError(f"unsupported architecture {self.arch!r}; expected one of {SUPPORTED_ARCHS}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(
        f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads} (GQA needs it)"
      )

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  def to_hf_dict(self) -> dict[str, Any]:
    """The equivalent transformers config dict (used by reference tests)."""
    model_type = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}[self.arch]
    d = dict(
      model_type=model_type,
      vocab_size=self.vocab_size,
      hidden_size=self.d_model,
      num_hidden_layers=self.n_layers,
      num_attention_heads=self.n_heads,
      num_key_value_heads=self.n_kv_heads,
      head_dim=self.head_dim,
      intermediate_size=self.d_ff,
      rms_norm_eps=self.rms_eps,
      rope_theta=self.rope_theta,
      tie_word_embeddings=self.tie_embeddings,
      max_position_embeddings=self.max_position,
      hidden_act="silu",
    )
    if self.arch == "llama":
      d["attention_bias"] = False
    if self.arch == "mistral":
      d["sliding_window"] = self.sliding_window
    if self.arch == "qwen2":
      d["use_sliding_window"] = False
    if self.rope_scaling is not None:
      d["rope_scaling"] = dict(
        rope_type="llama3",
        factor=self.rope_scaling.factor,
        low_freq_factor=self.rope_scaling.low_freq_factor,
        high_freq_factor=self.rope_scaling.high_freq_factor,
        original_max_position_embeddings=self.rope_scaling.original_max_position,
      )
    return d


def _rope_params(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads rope theta and scaling from both the transformers<5 and >=5 layouts."""
  params = d.get("rope_parameters") or {}
  scaling = d.get("rope_scaling") or params
  theta = float(d.get("rope_theta", params.get("rope_theta", 10000.0)))
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if rope_type in (None, "default"):
    return theta, None
  if rope_type != "llama3":
    raise ConfigError(f"unsupported rope scaling type {rope_type!r}; supported: default, llama3")
  return theta, RopeScaling(
    factor=float(scaling["factor"]),
    low_freq_factor=float(scaling["low_freq_factor"]),
    high_freq_factor=float(scaling["high_freq_factor"]),
    original_max_position=int(scaling["original_max_position_embeddings"]),
  )


def from_hf_dict(d: dict[str, Any]) -> ModelConfig:
  """Builds a `ModelConfig` from a transformers `config.json` dict."""
  model_type = d.get("model_type")
  if model_type not in SUPPORTED_ARCHS:
    raise ConfigError(f"unsupported model_type {model_type!r}; expected one of {SUPPORTED_ARCHS}")
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  missing = [k for k in required if k not in d]
  if missing:
    raise ConfigError(f"config.json is missing required fields {missing}")
  n_heads = int(d["num_attention_heads"])
  head_dim = d.get("head_dim") or int(d["hidden_size"]) // n_heads
  theta, scaling = _rope_params(d)
  sliding = None
  if model_type == "mistral":
    sliding = d.get("sliding_window")
  elif model_type == "qwen2" and d.get("use_sliding_window"):
    raise ConfigError("Qwen2 with use_sliding_window=True is not supported")
  if model_type == "llama" and d.get("attention_bias"):
    raise ConfigError("Llama with attention_bias=True is not supported")
  return ModelConfig(
    arch=model_type,
    vocab_size=int(d["vocab_size"]),
    d_model=int(d["hidden_size"]),
    n_layers=int(d["num_hidden_layers"]),
    n_heads=n_heads,
    n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
    head_dim=int(head_dim),
    d_ff=int(d["intermediate_size"]),
    rms_eps=float(d.get("rms_norm_eps", 1e-6)),
    rope_theta=theta,
    rope_scaling=scaling,
    tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    qkv_bias=model_type == "qwen2",
    sliding_window=int(sliding) if sliding else None,
    max_position=int(d.get("max_position_embeddings", 4096)),
  )


def load_hf_config(path: str | os.PathLike) -> ModelConfig:
  """Reads `config.json` (a file or a checkpoint directory holding one)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json at {path}")
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from e
  return from_hf_dict(d)
