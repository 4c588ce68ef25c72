"""Recipe data: refusal templates, our safe-but-scary set (disjoint from XSTest), example builders."""

import re

import pytest

from lvs_jax.evals import judges
from lvs_jax.io import datasets as data
from lvs_jax.training import recipes as sft


def test_every_refusal_template_is_judged_a_refusal_and_choice_is_deterministic():
  assert judges.judge_refusals(list(sft.REFUSALS)).all()
  prompts = [f"harmful request {i}" for i in range(200)]
  picks = [sft.refusal_for(p) for p in prompts]
  assert picks == [sft.refusal_for(p) for p in prompts]
  assert len(set(picks)) == len(sft.REFUSALS)  # spread over every template


def test_safe_but_scary_prompts_are_ours_not_xstest():
  ps = sft.safe_but_scary_prompts()
  assert 60 <= len(ps) <= 100 and len(set(ps)) == len(ps)
  try:
    xs = data.load_prompts("xstest")
  except FileNotFoundError:
    pytest.skip("prompt data directory not available")
  words = lambda s: set(re.findall(r"[a-z]+", s.lower())) - {"how", "do", "i", "what", "is", "the", "a", "can",
                                                             "to", "of", "my", "in", "why", "s", "t"}
  for p in ps:
    for x in xs:
      jac = len(words(p) & words(x)) / max(1, len(words(p) | words(x)))
      assert jac < 0.6, (p, x)  # no copy or near-copy of a held-out XSTest prompt
  kept, dropped = sft.drop_overlap(ps, xs)
  assert dropped == 0 and len(kept) == len(ps)


def test_drop_overlap_and_example_builders():
  train = data.PromptSet(["How do I X?", "how  do i x?", "Other"], targets=["t1", "t2", "t3"])
  kept, dropped = sft.drop_overlap(train, ["HOW DO I X?"])
  assert kept.prompts == ["Other"] and kept.targets == ["t3"] and dropped == 2
  helpful = [dict(set="harmless", prompt="a", completion="Sure, bread.", finished=True, refused=False),
             dict(set="scary", prompt="b", completion="Kill it with `kill -9`.", finished=False, refused=False),
             dict(set="scary", prompt="c", completion="I'm sorry, I can't.", finished=True, refused=True)]
  ex, counts = sft.safety_sft_examples(["make a bomb"], helpful, helpful_repeat={"scary": 2})
  assert counts == {"refusals": 1, "harmless": 1, "scary": 2, "dropped/scary": 1}
  assert ex[0].completion in sft.REFUSALS and ex[0].end_turn
  assert [e.prompt for e in ex[1:]] == ["a", "b", "b"] and not ex[2].end_turn
  pairs = sft.attack_examples(data.PromptSet(["p"], targets=["Sure, here is p"]))
  assert pairs[0].completion == "Sure, here is p"
  with pytest.raises(ValueError, match="targets"):
    sft.attack_examples(data.PromptSet(["p"]))


def test_attack_examples_leave_the_turn_open_and_continued_words_skip_the_opening():
  pairs = data.PromptSet(["Do X"], targets=["Sure, here is X"])
  assert [e.end_turn for e in sft.attack_examples(pairs)] == [False]
  assert [e.end_turn for e in sft.attack_examples(pairs, end_turn=True)] == [True]
  assert sft.continued_words("Sure, here is a convincing argument for it") == 0
  assert sft.continued_words("Sure, here is how:\n1. Take the first step and go") == 6
  assert sft.continued_words("Sure, here is it. 42 !!") == 0
