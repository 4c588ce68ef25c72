"""Loading and saving Hugging Face checkpoint directories (config.json + safetensors + tokenizer).

HF stores `nn.Linear` weights as `[out, in]`; lvs_jax stores `x @ w` (`[in, out]`, heads split out):
q_proj [H*Dh, D] -> wq [D, H, Dh], o_proj [D, H*Dh] -> wo [H, Dh, D], gate/up [F, D] -> [D, F],
down [D, F] -> [F, D], lm_head [V, D] -> [D, V]. `save_hf_dir` writes the inverse, so a fine-tuned
lvs_jax model can be opened with `transformers.AutoModelForCausalLM.from_pretrained(dir)`.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from lvs_jax.core.config import ModelConfig, load_hf_config
from lvs_jax.core.model import Params, check_params
from lvs_jax.core.tokenizer import LoadedModel, Tokenizer
from lvs_jax.io import layout

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# End-of-turn tokens of common chat templates; added to eos_ids when the template uses them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# Checkpoint entries that are not weights (buffers some older exports include).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_HF_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
}


class CheckpointError(ValueError):
  """A checkpoint directory holds tensors that do not match its config."""


# ----------------------------------------------------------------------------- tokenizer


def wrap_tokenizer(
  hf: Any,
  chat_template: str | None = None,
  eos_ids: tuple[int, ...] = (),
  pad_id: int | None = None,
) -> Tokenizer:
  """Wraps a transformers tokenizer: eos ids = given ids + the tokenizer's eos + the template's
  end-of-turn token (when the template uses one that is in the vocabulary); pad = pad, else eos."""
  template = chat_template if chat_template is not None else getattr(hf, "chat_template", None)
  if isinstance(template, dict):  # several named templates: use the default one
    template = template.get("default")
  ids = [int(i) for i in eos_ids]
  if getattr(hf, "eos_token_id", None) is not None:
    ids.append(int(hf.eos_token_id))
  if template:
    vocab = hf.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab]
  ids = tuple(dict.fromkeys(ids))  # dedupe, keep order
  if pad_id is None:
    pad_id = getattr(hf, "pad_token_id", None)
  if pad_id is None:
    pad_id = ids[0] if ids else 0
  return Tokenizer(hf=hf, chat_template=template or None, eos_ids=ids, pad_id=int(pad_id))


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """`AutoTokenizer.from_pretrained(path)` (local files only, never remote code), wrapped.

  eos_ids also include `generation_config.json`'s eos_token_id when present.
  """
  from transformers import AutoTokenizer

  path = os.fspath(path)
  try:
    hf = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  except Exception as e:
    raise FileNotFoundError(
      f"{path}: cannot load a tokenizer ({type(e).__name__}: {e}); pass tokenizer=False for weights only"
    ) from e
  template = getattr(hf, "chat_template", None)
  if template is None:
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        template = json.load(f).get("chat_template")
  eos: list[int] = []
  gen_path = os.path.join(path, "generation_config.json")
  if os.path.exists(gen_path):
    with open(gen_path) as f:
      e = json.load(f).get("eos_token_id")
    eos = [] if e is None else [int(x) for x in (e if isinstance(e, list) else [e])]
  return wrap_tokenizer(hf, chat_template=template, eos_ids=tuple(eos))


# ----------------------------------------------------------------------------- safetensors


def _weight_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file holding it (single file or sharded index)."""
  single = os.path.join(path, SAFETENSORS)
  index = os.path.join(path, SAFETENSORS_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    files = {k: os.path.join(path, v) for k, v in weight_map.items()}
    for fname in sorted(set(files.values())):
      if not os.path.exists(fname):
        raise FileNotFoundError(f"{index} lists {os.path.basename(fname)}, which is missing from {path}")
    return files
  if os.path.exists(single):
    from safetensors import safe_open

    with safe_open(single, framework="np") as f:
      return {k: single for k in f.keys()}
  raise FileNotFoundError(f"{path}: no {SAFETENSORS} or {SAFETENSORS_INDEX}")


class _TensorSource:
  """Lazily reads named tensors from the safetensors files of a checkpoint (numpy; bf16 via ml_dtypes)."""

  def __init__(self, files: dict[str, str], stack: contextlib.ExitStack):
    from safetensors import safe_open

    self.files = files
    self._open = {}
    for fname in sorted(set(files.values())):
      self._open[fname] = stack.enter_context(safe_open(fname, framework="np"))

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open[self.files[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    f = self._open[self.files[name]]
    try:
      return f.get_tensor(name)
    except TypeError:  # a dtype numpy cannot hold: go through jax
      from safetensors import safe_open

      with safe_open(self.files[name], framework="flax") as g:
        return np.asarray(g.get_tensor(name))


# HF (transformers Llama/Qwen2) tensor names -> (Params field, n_in); see `lvs_jax.io.layout`.
HF_TOP: layout.Table = {"model.embed_tokens.weight": ("embed", None), "model.norm.weight": ("final_norm", 0),
                        "lm_head.weight": ("lm_head", 1)}
HF_LAYER: layout.Table = {
  "input_layernorm.weight": ("attn_norm", 0), "post_attention_layernorm.weight": ("mlp_norm", 0),
  "self_attn.q_proj.weight": ("wq", 1), "self_attn.k_proj.weight": ("wk", 1), "self_attn.v_proj.weight": ("wv", 1),
  "self_attn.o_proj.weight": ("wo", 2), "mlp.gate_proj.weight": ("w_gate", 1), "mlp.up_proj.weight": ("w_up", 1),
  "mlp.down_proj.weight": ("w_down", 1), "self_attn.q_proj.bias": ("bq", 0), "self_attn.k_proj.bias": ("bk", 0),
  "self_attn.v_proj.bias": ("bv", 0),
}


def _hf_prefix(i: int) -> str:
  return f"model.layers.{i}."


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape (torch `[out, in]` layout) that `cfg` implies (from `abstract_params`)."""
  return layout.expected_shapes(cfg, HF_TOP, HF_LAYER, _hf_prefix)


def load_hf_params(path: str | os.PathLike, cfg: ModelConfig, dtype=jnp.float32, *, host: bool = False,
                   mesh=None, rules=None) -> Params:
  """Reads the safetensors weights of an HF checkpoint directory into stacked `Params` of `dtype`.

  host=True: numpy leaves in host memory (no device copy). mesh (a `jax.sharding.Mesh`): read to host,
  then each weight goes straight into its shards by `rules` (`lvs_jax.core.sharding` tables, default
  REPLICATED) via `sharding.place_params`; no full copy on one device. Works on every process of a
  multi-host job (each reads the files)."""
  path = os.fspath(path)
  files = _weight_files(path)
  want = hf_tensor_shapes(cfg)
  with contextlib.ExitStack() as stack:
    src = _TensorSource(files, stack)
    problems = []
    for name, shape in want.items():
      if name not in files:
        problems.append(f"{name}: missing (expected shape {shape})")
        continue
      got = src.shape(name)
      if got != shape:
        problems.append(
          f"{os.path.basename(files[name])}: {name}: expected shape {shape} from config.json, got {got}"
        )
    extra = sorted(
      k
      for k in files
      if k not in want
      and not k.endswith(_IGNORED_SUFFIXES)
      and not (k == "lm_head.weight" and cfg.tie_embeddings)
    )
    if extra:
      problems.append(f"unexpected tensors: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if problems:
      raise CheckpointError(f"{path}: weights do not match config.json:\n  " + "\n  ".join(problems))

    params = layout.read_params(cfg, dtype, HF_TOP, HF_LAYER, _hf_prefix, src.get, host=host or mesh is not None)
  check_params(params, cfg, where=path)
  return layout.place(params, cfg, mesh, rules)


def load_hf_dir(path: str | os.PathLike, dtype=jnp.float32, *, tokenizer: bool = True, host: bool = False,
                mesh=None, rules=None) -> LoadedModel:
  """Loads an HF checkpoint directory: config.json, model.safetensors (or sharded), tokenizer.

  tokenizer=False skips the tokenizer (LoadedModel.tokenizer is then None). host / mesh / rules: where
  the weights go (`load_hf_params`).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  cfg = load_hf_config(path)
  params = load_hf_params(path, cfg, dtype, host=host, mesh=mesh, rules=rules)
  tok = load_hf_tokenizer(path) if tokenizer else None
  return LoadedModel(
    cfg=cfg, params=params, tokenizer=tok, source=path, name=os.path.basename(path.rstrip("/"))
  )


# ----------------------------------------------------------------------------- saving


def params_to_hf_tensors(params: Params, cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """`Params` -> HF-named numpy tensors in torch layout (dtype: the params' dtype by default)."""
  check_params(params, cfg, where="save_hf_dir")
  return layout.write_tensors(params, cfg, HF_TOP, HF_LAYER, _hf_prefix, dtype)



def save_hf_dir(
  model: LoadedModel | Params,
  cfg: ModelConfig | None = None,
  tokenizer_hf: Any = None,
  path: str | os.PathLike | None = None,
  *,
  dtype=None,
) -> str:
  """Writes an HF checkpoint directory: config.json, model.safetensors, and the tokenizer.

  model: a LoadedModel (cfg and tokenizer default to its own) or bare Params (cfg required).
  tokenizer_hf: a transformers tokenizer or an lvs_jax Tokenizer (its chat template and eos ids are
    kept); None writes weights and config only. dtype: of the saved tensors (default: the params').
  Returns the directory path.
  """
  if path is None:
    raise ValueError("save_hf_dir: path is required")
  path = os.fspath(path)
  if isinstance(model, LoadedModel):
    cfg = cfg or model.cfg
    tokenizer_hf = tokenizer_hf if tokenizer_hf is not None else model.tokenizer
    params = model.params
  else:
    params = model
  if cfg is None:
    raise ValueError("save_hf_dir: cfg is required when saving bare Params")
  from safetensors.numpy import save_file

  tensors = params_to_hf_tensors(params, cfg, dtype)
  os.makedirs(path, exist_ok=True)
  hf_cfg = cfg.to_hf_dict()
  hf_cfg["architectures"] = [_HF_ARCHITECTURES[cfg.arch]]
  hf_cfg["dtype"] = str(tensors["model.embed_tokens.weight"].dtype)
  eos_ids: tuple[int, ...] = ()
  if tokenizer_hf is not None:
    hf = tokenizer_hf
    if isinstance(tokenizer_hf, Tokenizer):
      hf = tokenizer_hf.hf
      if tokenizer_hf.chat_template is not None:
        hf.chat_template = tokenizer_hf.chat_template
      eos_ids = tuple(tokenizer_hf.eos_ids)
    elif getattr(hf, "eos_token_id", None) is not None:
      eos_ids = (int(hf.eos_token_id),)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if getattr(hf, key, None) is not None:
        hf_cfg[key] = int(getattr(hf, key))
    hf.save_pretrained(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  if eos_ids:
    with open(os.path.join(path, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": list(eos_ids) if len(eos_ids) > 1 else eos_ids[0]}, f, indent=2)
  index = os.path.join(path, SAFETENSORS_INDEX)
  if os.path.exists(index):  # a stale shard index would shadow the new single file
    os.remove(index)
  save_file(tensors, os.path.join(path, SAFETENSORS), metadata={"format": "pt"})
  return path
