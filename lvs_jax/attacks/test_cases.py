"""Saved attacks as fixed-source test cases: write them in HarmBench's layout, load them back (or a
JailbreakBench artifact), and evaluate a set of them against any model or checkpoint in one batched call.

Files (under a directory):
  test_cases.json   HarmBench's layout: {behavior_id: [test_case, ...]}, a test case being the full user
                    message (behavior + attack string, or the filled AutoDAN template)
  logs.json         {behavior_id: [{behavior, test_case, method, model, loss, step, suffix_ids, ...}]}:
                    what produced each test case (ids only for GCG; they are the model's tokenizer's)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from lvs_jax.attacks import common
from lvs_jax.core import generate as generate_lib
from lvs_jax.io import files


@dataclasses.dataclass(frozen=True)
class TestCase:
  """One attack prompt: the behavior it attacks (id and text) and the user message to send."""

  behavior_id: str
  behavior: str
  test_case: str
  meta: dict = dataclasses.field(default_factory=dict)


def behavior_id(source: str, index: int) -> str:
  """A stable id for row `index` of a prompt set without ids ("harmful_val/0007")."""
  return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', os.path.basename(str(source)) or 'prompts')}/{index:04d}"


def save(directory: str, cases: Sequence[TestCase]) -> str:
  """Writes test_cases.json (HarmBench layout) and logs.json; returns the test_cases.json path.
  Existing files are merged (same behavior id: the new cases are appended, duplicates dropped)."""
  files.makedirs(directory)
  path, log_path = os.path.join(directory, "test_cases.json"), os.path.join(directory, "logs.json")
  tc, logs = {}, {}
  if os.path.exists(path):
    with open(path) as f:
      tc = json.load(f)
  if os.path.exists(log_path):
    with open(log_path) as f:
      logs = json.load(f)
  for c in cases:
    if c.test_case in tc.get(c.behavior_id, []):
      continue
    tc.setdefault(c.behavior_id, []).append(c.test_case)
    logs.setdefault(c.behavior_id, []).append({"behavior": c.behavior, "test_case": c.test_case, **c.meta})
  for p, obj in ((path, tc), (log_path, logs)):
    files.atomic_write_json(p, obj, indent=1)  # process 0 only
  return path


def load(path: str) -> list[TestCase]:
  """Test cases from a HarmBench-layout test_cases.json (with logs.json beside it for behavior texts), a
  directory holding one, or a JailbreakBench artifact ({"parameters", "jailbreaks"})."""
  if os.path.isdir(path):
    path = os.path.join(path, "test_cases.json")
  with open(path) as f:
    data = json.load(f)
  if isinstance(data, dict) and "jailbreaks" in data:
    from lvs_jax.io import datasets

    ps = datasets.load_prompts(path, format="jailbreakbench")
    return [TestCase(behavior_id("jbb", i), b, p, {"source": ps.source}) for i, (p, b) in
            enumerate(zip(ps.prompts, ps.behaviors))]
  if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
    raise ValueError(f"{path}: expected HarmBench's {{behavior_id: [test_case, ...]}} or a JailbreakBench artifact")
  logs = {}
  log_path = os.path.join(os.path.dirname(path), "logs.json")
  if os.path.exists(log_path):
    with open(log_path) as f:
      logs = json.load(f)
  out = []
  for bid, cases in data.items():
    for i, c in enumerate(cases):
      if not isinstance(c, str):
        raise ValueError(f"{path}: test case {i} of {bid!r} is {type(c).__name__}, not a string")
      meta = logs.get(bid, [{}] * len(cases))[i] if i < len(logs.get(bid, [])) else {}
      out.append(TestCase(bid, meta.get("behavior", bid), c, {k: v for k, v in meta.items()
                                                              if k not in ("behavior", "test_case")}))
  return out


def evaluate(model, cases: Sequence[TestCase], *, max_new_tokens: int = 64, batch_size: int = 16,
             prefixes="jailbreakbench", system: str | None = None) -> dict:
  """Greedy completions of every test case (chat-formatted user messages, one compiled batch shape) and
  their judgement: refused (substring judge), success = not refused and not empty, continued = words
  after the completion's first sentence (the `continued` measure). Returns lists aligned with `cases`."""
  from lvs_jax.training.recipes import continued_words

  gens = generate_lib.generate(model, [c.test_case for c in cases], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, system=system)
  ref = common.refused(gens.completions, prefixes)
  nonempty = np.array([bool(c.strip()) for c in gens.completions])
  cont = [continued_words(c) for c in gens.completions]
  return dict(completions=gens.completions, refused=ref.tolist(), success=(~ref & nonempty).tolist(),
              continued=cont)
