"""Fixed-shape batches over a list of prompts (or of indices): one compilation serves every batch.

A jitted function compiles once per input shape, so the last, shorter batch of a prompt list would
cost a second compilation (a minute on a 7B model). Every caller that feeds a jitted kernel in
batches pads the last batch by repeating its final item and drops the padded rows' outputs:

  for chunk, n in pad_batches(prompts, batch_size):
    out.append(np.asarray(kernel(...chunk...))[:n])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def pad_batches(items: Sequence[T], batch_size: int, *, fixed: bool = False) -> Iterator[tuple[list[T], int]]:
  """Consecutive batches of `items` -> (batch, n_real): `batch` holds the next n_real items followed by
  copies of the last one, so every batch has the same length.

  That length is min(batch_size, len(items)) (no wasted rows when everything fits in one batch), or
  batch_size with fixed=True (the same shape for any number of items: for callers that call the same
  kernel on prompt lists of different lengths, e.g. `generate` on the chunks of a resumable loop).
  """
  if batch_size < 1:
    raise ValueError(f"pad_batches: batch_size must be >= 1, got {batch_size}")
  items = list(items)
  size = batch_size if fixed else min(batch_size, len(items))
  for b0 in range(0, len(items), batch_size):
    chunk = items[b0:b0 + batch_size]
    yield chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)
