"""Shared test fixtures: tiny configs and a torch reference model with the same weights."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_config(name: str):
  """experiments/configs/<name>.py as a module (its section_config(), make_smoke(), get_config())."""
  from lvs_jax.core import cli

  return cli.config_module(os.path.join(ROOT, "experiments", "configs", f"{name}.py"))


TINY = dict(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
            rope_theta=10000.0, max_position=256)

def tiny(arch: str = "llama", seed: int = 0, **overrides):
  """(cfg, params) for a tiny random model; weights std 0.1 so logits are not all ~equal."""
  base = dict(TINY)
  base.update(overrides)
  kind = {"llama": {}, "mistral": {"sliding_window": 8}, "qwen2": {"qkv_bias": True}}[arch]
  base = {**kind, **base}
  cfg = ModelConfig(arch=arch, **base)
  return cfg, model_lib.init_params(cfg, jax.random.key(seed), std=0.1)


def torch_model(params: model_lib.Params, cfg: ModelConfig):
  """A transformers model (eager attention, float32) holding exactly `params`."""
  import torch
  import transformers

  from lvs_jax.io.hf import params_to_hf_tensors

  hfc = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
  hfc._attn_implementation = "eager"
  tm = transformers.AutoModelForCausalLM.from_config(hfc, dtype=torch.float32).eval()
  sd = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in params_to_hf_tensors(params, cfg, jnp.float32).items()}
  missing, unexpected = tm.load_state_dict(sd, strict=False)
  assert not unexpected, unexpected
  assert set(missing) <= {"lm_head.weight"}, missing
  return tm



def finish(p, timeout=300):
  """(returncode, combined output) of a child process started with stdout=PIPE, stderr=STDOUT."""
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def last_step(path):
  """The last step in a training run's metrics.jsonl (0 when it does not exist yet)."""
  import os

  from lvs_jax.training import core as training

  rows = training.read_metrics(path) if os.path.exists(path) else []
  return rows[-1]["step"] if rows else 0


def kill_after_step(p, metrics_path, target: int, delay: float, timeout: float = 240):
  """SIGKILLs child `p` `delay` seconds after its metrics reach step `target` (or it exits); -> finish(p)."""
  import signal
  import time

  deadline = time.time() + timeout
  while last_step(metrics_path) < target and p.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  time.sleep(delay)
  p.send_signal(signal.SIGKILL)
  return finish(p)


CHAT_TEMPLATE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_tokenizer():
  """A 300-token byte-level BPE tokenizer with SmolLM2's chat template (for tiny random chat models)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(["How do I bake bread? I'm sorry, but I can't help with that. Sure, here is a plan."] * 4,
                         trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                              pad_token="<|im_end|>", unk_token="<|endoftext|>")
  fast.chat_template = CHAT_TEMPLATE
  return fast
