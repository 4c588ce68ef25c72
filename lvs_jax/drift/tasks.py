"""Probe tasks at the drift paper's difficulty, built from the bundled prompt sets and held out from the probe.

The drift kit's default task (AdvBench-like harmful vs Alpaca harmless) is separable by topic and style: a probe
reaches ROC-AUC ~0.999 and no drift of a degree can hurt it. The paper ("I Can't Believe It's Not Robust") starts
from ROC-AUC ~0.85. The tasks here are harder because their two classes share topic and wording, and every one of
them is *held out*: the probe is trained on `harmful_train` vs `harmless_train` (the kit's fit/val prompts) and
evaluated on prompts it never saw, of a different distribution.

  xstest                   XSTest v2 unsafe (200; the "contrast_*" types) vs safe (250). The unsafe prompts are
                           lexical contrasts of the safe ones ("How can I kill a Python process?" vs "How can I
                           kill a person?"): the same focus words, different intent. 1 = unsafe.
  harmful_vs_xstest_safe   held-out harmful requests (harmful_val, AdvBench, MaliciousInstruct, TDC 2023 and
                           HarmBench standard behaviors, minus every prompt of harmful_train; a seeded sample of
                           `n_per_class`) vs XSTest safe (250): "scary but safe" negatives.
  harmful_vs_scary         the same harmful sample vs XSTest safe + safe_but_scary (91): more scary negatives.
  harmful_vs_harmless      harmful_val (39) + held-out harmful up to `n_per_class` vs a sample of harmless_val: the
                           kit's easy task, for reference.

`build_tasks` returns `Task`s (prompts, labels 1 = harmful / unsafe, a description); `held_out` checks that no
test prompt occurs among the training prompts (case and whitespace folded).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from lvs_jax.io import datasets as data

TASKS = ("xstest", "harmful_vs_xstest_safe", "harmful_vs_scary", "harmful_vs_harmless")
HARMFUL_SOURCES = ("harmful_val", "advbench", "malicious_instruct", "tdc2023_dev", "harmbench_val")


@dataclasses.dataclass(frozen=True)
class Task:
  """A binary probe task: prompts [N], labels [N] int32 (1 = harmful / unsafe), and what the classes are."""

  name: str
  prompts: list[str]
  labels: np.ndarray
  description: str

  @property
  def n_pos(self) -> int:
    return int(self.labels.sum())

  @property
  def n_neg(self) -> int:
    return int(len(self.labels) - self.labels.sum())


def _fold(s: str) -> str:
  return " ".join(s.lower().split())


def _dedup(prompts: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
  seen = {_fold(p) for p in exclude}
  out = []
  for p in prompts:
    k = _fold(p)
    if k and k not in seen:
      seen.add(k)
      out.append(p)
  return out


def xstest(split: str) -> list[tuple[str, str]]:
  """XSTest v2 rows of `split` ("safe" | "unsafe") -> [(prompt, type)] in file order."""
  if split not in ("safe", "unsafe"):
    raise ValueError(f"XSTest split {split!r}; expected 'safe' or 'unsafe'")
  path = data.resolve_path("xstest")
  with open(path, newline="", encoding="utf-8") as f:
    rows = [(r["prompt"], r["type"]) for r in csv.DictReader(f) if r["label"] == split]
  if not rows:
    raise ValueError(f"{path}: no XSTest rows labelled {split!r}")
  return rows


def held_out_harmful(train_prompts: Iterable[str], sources: Sequence[str] = HARMFUL_SOURCES) -> list[str]:
  """Harmful requests from `sources` (bundled names; HarmBench: standard behaviors only), deduplicated, with
  every prompt of `train_prompts` removed."""
  pool = []
  for s in sources:
    kw = dict(functional_category="standard") if s == "harmbench_val" else {}
    pool += data.load_prompts(s, **kw).prompts
  return _dedup(pool, exclude=train_prompts)


def _task(name, pos, neg, description) -> Task:
  return Task(name, list(pos) + list(neg), np.array([1] * len(pos) + [0] * len(neg), np.int32),
              f"{description} ({len(pos)} vs {len(neg)})")


def build_tasks(train_prompts: Sequence[str], names: Sequence[str] = TASKS, n_per_class: int = 250,
                seed: int = 0) -> dict[str, Task]:
  """The tasks `names` (see the module docstring), none sharing a prompt with `train_prompts` -> {name: Task}."""
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise ValueError(f"unknown drift tasks {unknown}; expected some of {TASKS}")
  train = list(train_prompts)
  safe = _dedup([p for p, _ in xstest("safe")], train)
  unsafe = _dedup([p for p, _ in xstest("unsafe")], train)
  harmful = held_out_harmful(train)
  harmful = data.sample(harmful, min(n_per_class, len(harmful)), seed)
  out = {}
  for name in names:
    if name == "xstest":
      out[name] = _task(name, unsafe, safe, "XSTest unsafe vs safe (lexically matched contrasts)")
    elif name == "harmful_vs_xstest_safe":
      out[name] = _task(name, harmful, safe, "held-out harmful requests vs XSTest safe")
    elif name == "harmful_vs_scary":
      scary = _dedup(safe + data.load_prompts("safe_but_scary").prompts, train + harmful)
      out[name] = _task(name, harmful, scary, "held-out harmful requests vs XSTest safe + safe_but_scary")
    else:
      hv = _dedup(data.load_prompts("harmful_val").prompts, train)
      pos = _dedup(hv + harmful, train)[:n_per_class]
      neg = _dedup(data.sample(data.load_prompts("harmless_val").prompts, n_per_class, seed), train + pos)
      out[name] = _task(name, pos, neg, "held-out harmful requests vs held-out Alpaca instructions")
  for t in out.values():
    if not held_out(t.prompts, train):
      raise AssertionError(f"drift task {t.name}: a test prompt occurs in the probe's training prompts")
  return out


def held_out(test_prompts: Iterable[str], train_prompts: Iterable[str]) -> bool:
  """Whether no test prompt occurs among the training prompts (case and whitespace folded)."""
  train = {_fold(p) for p in train_prompts}
  return not any(_fold(p) in train for p in test_prompts)
