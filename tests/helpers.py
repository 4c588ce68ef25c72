"""Shared test fixtures: tiny configs and a torch reference model with the same weights."""

from __future__ import annotations

import jax
import numpy as np

from lvs_jax import model as model_lib
from lvs_jax.config import ModelConfig

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

  hfc = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
  hfc._attn_implementation = "eager"
  tm = transformers.AutoModelForCausalLM.from_config(hfc, dtype=torch.float32).eval()
  sd = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in hf_state_dict(params, cfg).items()}
  missing, unexpected = tm.load_state_dict(sd, strict=False)
  assert not unexpected, unexpected
  assert set(missing) <= {"lm_head.weight"}, missing
  return tm


def hf_state_dict(params: model_lib.Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """lvs_jax Params -> transformers Llama/Mistral/Qwen2 state dict (torch [out, in] layout)."""
  sd = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm}
  lp = params.layers
  D = cfg.d_model
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    sd[p + "input_layernorm.weight"] = lp.attn_norm[i]
    sd[p + "post_attention_layernorm.weight"] = lp.mlp_norm[i]
    sd[p + "self_attn.q_proj.weight"] = lp.wq[i].reshape(D, -1).T
    sd[p + "self_attn.k_proj.weight"] = lp.wk[i].reshape(D, -1).T
    sd[p + "self_attn.v_proj.weight"] = lp.wv[i].reshape(D, -1).T
    sd[p + "self_attn.o_proj.weight"] = lp.wo[i].reshape(-1, D).T
    if lp.bq is not None:
      sd[p + "self_attn.q_proj.bias"] = lp.bq[i].reshape(-1)
      sd[p + "self_attn.k_proj.bias"] = lp.bk[i].reshape(-1)
      sd[p + "self_attn.v_proj.bias"] = lp.bv[i].reshape(-1)
    sd[p + "mlp.gate_proj.weight"] = lp.w_gate[i].T
    sd[p + "mlp.up_proj.weight"] = lp.w_up[i].T
    sd[p + "mlp.down_proj.weight"] = lp.w_down[i].T
  if params.lm_head is not None:
    sd["lm_head.weight"] = params.lm_head.T
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}
