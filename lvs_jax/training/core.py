"""Supervised fine-tuning core: chat examples -> batches, a pure train step, and the training loop.

Pieces, each a plain function of arrays or of plain Python data:

  Example, tokenize        (prompt, completion) pairs, chat-templated; the loss covers the completion
                           and the end-of-turn token only (the prompt, its template and the system
                           prompt are context, never targets).
  Dataset                  batches by padding (one example per row) or packing (several examples per
                           row, attention kept within an example); `Dataset.batch(step)` is a pure
                           function of (seed, step), so a resumed run sees exactly the same data.
  make_optimizer           AdamW with linear warmup + cosine decay, global-norm clipping; weight decay
                           on matrices only (never on norms).
  TrainState               the pytree that is checkpointed: step, trainable params (LoRA adapters or
                           full Params), optimizer state, rng.
  make_train_step          `step(state, batch) -> (state, metrics)`, jitted with the state donated;
                           gradient accumulation over the batch's leading micro-batch axis; LoRA or
                           full fine-tuning decided by the type of `state.params`; optional bfloat16
                           compute with float32 master weights.
  train_loop               steps + per-step JSONL metrics + checkpoints (`lvs_jax.io.checkpoints`), resuming
                           from the last committed checkpoint.

Axis names as in `lvs_jax.core.model`; plus k = micro-batches per step, b = rows per micro-batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig
from lvs_jax.core.tokenizer import PromptError, Tokenizer
from lvs_jax.io import datasets as data_lib
from lvs_jax.io import files
from lvs_jax.training import lora as lora_lib

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# --- Examples and tokenization ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
  """One supervised example: a user message and the assistant reply to learn.

  end_turn: the reply is complete, so the model also learns to emit the end-of-turn token after it
  (False for replies cut at a token budget, which must not teach the model to stop there).
  """

  prompt: str
  completion: str
  end_turn: bool = True


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """ids: [n] int32 = chat-formatted prompt + completion (+ end-of-turn); the first n_prompt are context."""

  ids: np.ndarray
  n_prompt: int


def end_of_turn_id(tokenizer: Tokenizer) -> int:
  """The token that ends an assistant turn: the template's end-of-turn token if any, else eos."""
  vocab = tokenizer.hf.get_vocab()
  for t in END_OF_TURN_TOKENS:
    if tokenizer.chat_template and t in tokenizer.chat_template and t in vocab and vocab[t] in tokenizer.eos_ids:
      return int(vocab[t])
  if not tokenizer.eos_ids:
    raise ValueError("tokenizer has no end-of-sequence token to end completions with")
  return int(tokenizer.eos_ids[0])


def tokenize(tokenizer: Tokenizer, examples: Sequence[Example], max_len: int,
             system: str | None = None) -> tuple[list[Tokenized], int]:
  """Chat-formats and tokenizes examples -> (tokenized, number whose completion was truncated).

  Prompt and completion are encoded separately and concatenated, which is exactly what the model
  sees when it generates the completion after the formatted prompt. Completions that do not fit
  `max_len` are cut (the end-of-turn token is then absent); a prompt that alone leaves no room for a
  single completion token raises PromptError.
  """
  eot = end_of_turn_id(tokenizer)
  out, truncated = [], 0
  for i, ex in enumerate(examples):
    p = tokenizer.encode(tokenizer.format_chat(ex.prompt, system=system))
    c = tokenizer.encode(ex.completion) + ([eot] if ex.end_turn else [])
    if len(p) + 1 > max_len:
      raise PromptError(f"example {i}: the prompt has {len(p)} tokens, leaving no room in max_len={max_len} "
                        f"(starts {ex.prompt[:60]!r})")
    if len(p) + len(c) > max_len:
      truncated += 1
      c = c[: max_len - len(p)]
    out.append(Tokenized(np.asarray(p + c, np.int32), len(p)))
  return out, truncated


# --- Batches ----------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """One optimizer step of data, every field [k, b, T] (k micro-batches of b rows).

  tokens: input ids (pad where segment_ids == 0); targets: the next token at each position;
  loss_mask: float32, 1 where the target is a completion token (the loss averages over these);
  segment_ids: 1, 2, ... = which example of the row a token belongs to, 0 = padding;
  positions: RoPE position of each token within its example.
  """

  tokens: jax.Array
  targets: jax.Array
  loss_mask: jax.Array
  segment_ids: jax.Array
  positions: jax.Array


def pack_rows(rows: Sequence[Sequence[Tokenized]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded numpy arrays [R, T] for rows of examples (each row's total length <= seq_len)."""
  R = len(rows)
  tokens = np.full((R, seq_len), pad_id, np.int32)
  targets = np.full((R, seq_len), pad_id, np.int32)
  loss_mask = np.zeros((R, seq_len), np.float32)
  seg = np.zeros((R, seq_len), np.int32)
  pos = np.zeros((R, seq_len), np.int32)
  for r, row in enumerate(rows):
    t0 = 0
    for j, ex in enumerate(row):
      n = len(ex.ids)
      if t0 + n > seq_len:
        raise ValueError(f"row {r} holds {t0 + n} tokens, more than seq_len={seq_len}")
      tokens[r, t0:t0 + n] = ex.ids
      targets[r, t0:t0 + n - 1] = ex.ids[1:]
      # Position t predicts ids[t + 1]: a completion token when t + 1 >= n_prompt.
      loss_mask[r, t0 + ex.n_prompt - 1:t0 + n - 1] = 1.0
      seg[r, t0:t0 + n] = j + 1
      pos[r, t0:t0 + n] = np.arange(n)
      t0 += n
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=seg, positions=pos)


class Dataset:
  """Batches of tokenized examples whose order is a pure function of (seed, step).

  Every epoch visits each example once in the order of a seeded permutation (`lvs_jax.io.datasets`'s
  platform-independent hash permutation, seeded by (seed, epoch)). Without packing, step s takes
  examples [s*N, (s+1)*N) of that endless stream (N = micro_batches * batch_size rows, one example
  each). With packing, each epoch's stream is cut greedily into rows of at most seq_len tokens and
  step s takes rows [s*N, (s+1)*N) of the endless row stream.
  """

  def __init__(self, examples: Sequence[Tokenized], *, batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
               micro_batches: int = 1, packing: bool = False):
    if not examples:
      raise ValueError("Dataset: no examples")
    long = [i for i, e in enumerate(examples) if len(e.ids) > seq_len]
    if long:
      raise ValueError(f"Dataset: {len(long)} examples are longer than seq_len={seq_len} (first: {long[0]})")
    self.examples = list(examples)
    self.batch_size, self.seq_len, self.pad_id = int(batch_size), int(seq_len), int(pad_id)
    self.seed, self.micro_batches, self.packing = int(seed), int(micro_batches), bool(packing)
    self._epoch_rows: list[list[list[int]]] = []
    self._cached_order: tuple[int, np.ndarray | None] = (-1, None)

  @property
  def rows_per_step(self) -> int:
    return self.batch_size * self.micro_batches

  def _order(self, epoch: int) -> np.ndarray:
    if self._cached_order[0] != epoch:
      self._cached_order = (epoch, data_lib._permutation(len(self.examples), self.seed * 1_000_003 + epoch))
    return self._cached_order[1]

  def _rows_of_epoch(self, epoch: int) -> list[list[int]]:
    while len(self._epoch_rows) <= epoch:
      e = len(self._epoch_rows)
      rows, cur, used = [], [], 0
      for i in self._order(e):
        n = len(self.examples[i].ids)
        if cur and used + n > self.seq_len:
          rows.append(cur)
          cur, used = [], 0
        cur.append(int(i))
        used += n
      rows.append(cur)
      self._epoch_rows.append(rows)
    return self._epoch_rows[epoch]

  def row_indices(self, step: int) -> list[list[int]]:
    """Example indices of each of the step's k*b rows."""
    N = self.rows_per_step
    if not self.packing:
      n = len(self.examples)
      return [[int(self._order(j // n)[j % n])] for j in range(step * N, (step + 1) * N)]
    out, epoch, first = [], 0, step * N
    while len(out) < N:
      rows = self._rows_of_epoch(epoch)
      if first >= len(rows):
        first -= len(rows)
      else:
        take = rows[first:first + N - len(out)]
        out.extend(take)
        first = 0
      epoch += 1
    return out

  def steps_per_epoch(self) -> float:
    n_rows = len(self._rows_of_epoch(0)) if self.packing else len(self.examples)
    return n_rows / self.rows_per_step

  def batch(self, step: int) -> Batch:
    rows = [[self.examples[i] for i in r] for r in self.row_indices(step)]
    arrays = pack_rows(rows, self.seq_len, self.pad_id)
    k, b = self.micro_batches, self.batch_size
    return Batch(**{name: a.reshape(k, b, self.seq_len) for name, a in arrays.items()})

  def fingerprint(self) -> str:
    """sha256 of every example's tokens and prompt length and of the batching settings."""
    h = hashlib.sha256()
    h.update(json.dumps([self.batch_size, self.seq_len, self.pad_id, self.seed, self.micro_batches,
                         self.packing]).encode())
    for e in self.examples:
      h.update(np.int64(e.n_prompt).tobytes())
      h.update(np.int64(len(e.ids)).tobytes())
      h.update(np.ascontiguousarray(e.ids, np.int32).tobytes())
    return h.hexdigest()


# --- Model call and loss ----------------------------------------------------------------------------


def forward_train(params: model_lib.Params, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                  cfg: ModelConfig, *, remat: bool = True, lora: lora_lib.LoraParams | None = None,
                  edit=None) -> jax.Array:
  """Logits [B, T, V] (float32) of a right-padded or packed batch: causal attention within each segment.

  tokens, segment_ids, positions: [B, T]. The layer loop is `lvs_jax.core.model.scan_layers`; on a
  row with one example (segment 1, then padding) the logits equal `forward(params, tokens, cfg,
  attention_mask=segment_ids > 0)` at the real tokens. lora: adapters run unmerged, x @ W + s (x @ a) @ b
  (`lvs_jax.core.model.linear`): no merged weight copy, and updates below the weights' dtype
  resolution still reach the output. edit: an `lvs_jax.core.edit` Edit applied in the layer loop (slots =
  the batch's T positions), e.g. latent adversarial training's perturbation (`lvs_jax.training.lat`).
  """
  T = tokens.shape[1]
  valid = segment_ids > 0
  causal = model_lib.attention_mask_4d(jnp.arange(T), valid, cfg.sliding_window)  # [B, 1, 1, T, S]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
  ctx = model_lib.Context(positions=positions, mask=causal & same, start=0)
  adapters = None if lora is None else lora_lib.adapters(lora)
  h, _, _ = model_lib.scan_layers(params.layers, model_lib.embed(params, tokens), cfg, ctx, lora=adapters,
                                  edit=edit, remat=remat)
  return model_lib.unembed(params, h, cfg)


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def model_params(trainable, base: model_lib.Params | None) -> model_lib.Params:
  """The full weights (base + merged LoRA adapters, or the trainable Params themselves) for export and
  evaluation; training itself runs the adapters unmerged (`loss_sums`)."""
  if isinstance(trainable, lora_lib.LoraParams):
    if base is None:
      raise ValueError("LoRA training needs the base Params")
    return lora_lib.merge(base, trainable)
  return trainable


def loss_sums(trainable, base: model_lib.Params | None, batch: Batch, cfg: ModelConfig, *,
              compute_dtype=jnp.float32, remat: bool = True,
              edit=None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(sum of completion-token NLL in nats, (number of completion tokens, number predicted correctly)).

  batch: one micro-batch, fields [b, T]. Sums (not means) so that micro-batches add up exactly; the
  step divides by the total token count. compute_dtype: the weights are cast to it (bfloat16 compute,
  float32 master weights); LoRA adapters stay in their own dtype and run unmerged, their term added to
  the base product in float32; logits and the loss are float32. edit: see `forward_train`.
  """
  lora = None
  if isinstance(trainable, lora_lib.LoraParams):
    if base is None:
      raise ValueError("LoRA training needs the base Params")
    trainable, lora = base, trainable
  params = _cast(trainable, compute_dtype)
  logits = forward_train(params, batch.tokens, batch.segment_ids, batch.positions, cfg, remat=remat, lora=lora,
                         edit=edit)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
  mask = batch.loss_mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == batch.targets).astype(jnp.float32)
  return jnp.sum(nll * mask), (jnp.sum(mask), jnp.sum(correct * mask))


# --- Optimizer and state ----------------------------------------------------------------------------


def make_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                  end_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to end_fraction * learning_rate."""
  warmup_steps = min(int(warmup_steps), max(int(total_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(int(total_steps), warmup_steps + 1),
                                            end_value=learning_rate * end_fraction)


def make_optimizer(schedule: optax.Schedule | float, *, weight_decay: float = 0.0, clip_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; weight decay applies to leaves with >= 2 axes only."""
  decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)
  parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """What a checkpoint holds. step: [] int32 (steps taken); params: LoraParams or Params (float32 master
  weights); opt_state: the optax state; rng: [2] uint32 raw PRNG key, split once per step."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state(params, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jax.random.PRNGKey(seed))


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, base: model_lib.Params | None = None,
                    *, schedule: optax.Schedule | None = None, compute_dtype=jnp.float32, remat: bool = True,
                    donate: bool = True) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """A jitted `step(state, batch) -> (state, metrics)`; the state's buffers are donated.

  LoRA when `state.params` is `LoraParams` (then `base` is the frozen model, passed to the compiled
  function as an argument, never baked in as a constant), full fine-tuning when it is `Params`.
  The batch's k micro-batches are scanned and their gradients summed, then divided by the total
  number of completion tokens: the same update as one batch of k*b rows, up to float rounding.
  metrics: loss (mean NLL per completion token, nats), tokens, accuracy, grad_norm (before
  clipping), lr (when `schedule` is given).
  """

  def step(state: TrainState, batch: Batch, base):
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def micro(carry, mb):
      g_acc, nll_acc, n_acc, c_acc = carry
      (nll, (n, c)), g = grad_fn(state.params, base, mb, cfg, compute_dtype=compute_dtype, remat=remat)
      return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n, c_acc + c), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, state.params), zero, zero, zero)
    (g, nll, n, c), _ = jax.lax.scan(micro, init, batch)
    denom = jnp.maximum(n, 1.0)
    g = jax.tree.map(lambda x: x / denom.astype(x.dtype), g)
    # optax mixes Python floats and int32 step counts (Adam's bias correction): standard promotion.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(g, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      lr = None if schedule is None else jnp.asarray(schedule(state.step), jnp.float32)
    rng, _ = jax.random.split(state.rng)
    metrics = dict(loss=nll / denom, tokens=n, accuracy=c / denom, grad_norm=optax.global_norm(g))
    if lr is not None:
      metrics["lr"] = lr
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
  return lambda state, batch: jitted(state, batch, base)


# --- Loop --------------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike, max_step: int | None = None) -> list[dict]:
  """Rows of a metrics JSONL file (a line cut by a kill, and everything after it, is dropped)."""
  return [r for r in files.read_jsonl(path, log=None) if max_step is None or r["step"] <= max_step]


def _rewrite(path: str, rows: list[dict]) -> None:
  files.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def train_loop(state: TrainState, step_fn: Callable, dataset: Dataset, num_steps: int, *,
               checkpointer=None, metrics_path: str | None = None, log: Callable[[str], None] | None = tqdm.write,
               log_every: int = 10, progress: bool = True) -> tuple[TrainState, list[dict]]:
  """Runs `step_fn` until state.step == num_steps -> (final state, metrics rows of every step).

  checkpointer: a `lvs_jax.io.checkpoints.Checkpointer`; the state is saved before the first step (step
  0), at its interval and at the last step. Resuming is the caller's `checkpointer.restore_latest`
  before calling this; rows of `metrics_path` after the restored step (written by a run that died
  before its next checkpoint) are dropped, so the file holds each step once. Each row: step
  (1-based, = state.step after the update), the step's metrics and `seconds` (wall time of the
  step, host-synchronized).
  """
  start = int(state.step)
  rows = []
  if metrics_path and jax.process_index() != 0:
    metrics_path = None  # one writer: under jax.distributed only process 0 writes the metrics file
  if metrics_path:
    rows = read_metrics(metrics_path, max_step=start)
    _rewrite(metrics_path, rows)
  if checkpointer is not None and start == 0:
    checkpointer.save(state)  # step 0: the starting point of the trajectory
  f = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
  bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", disable=not progress or start >= num_steps)
  try:
    for s in range(start, num_steps):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, dataset.batch(s))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      row = dict(step=s + 1, **metrics, seconds=time.perf_counter() - t0)
      rows.append(row)
      if f:
        f.write(json.dumps(row) + "\n")
        f.flush()
      bar.update(1)
      bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
      if log and ((s + 1) % log_every == 0 or s == start or s + 1 == num_steps):
        acc = f" acc {row['accuracy']:.3f}" if "accuracy" in row else ""
        log(f"step {s + 1}/{num_steps} loss {row['loss']:.4f}{acc} gnorm {row['grad_norm']:.3f} {row['seconds']:.2f}s")
      if checkpointer is not None:
        checkpointer.save(state, force=s + 1 == num_steps)
  finally:
    bar.close()
    if f:
      f.close()
  return state, rows
