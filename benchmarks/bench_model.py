"""Forward and generation speed: lvs_jax vs transformers + torch on the same weights, one process.

  python benchmarks/bench_model.py                       # SmolLM2-135M-Instruct, float32, CPU
  python benchmarks/bench_model.py --batch=16 --seq=64 --new_tokens=64 --repeats=5

Prints a table of median wall seconds (after a warm-up call that pays compilation) and the ratio
torch / lvs_jax (> 1 means lvs_jax is faster). Both sides run greedy decoding with a KV cache and
no early stop (EOS disabled), so they do the same work; the forward is a full [B, T] pass.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from lvs_jax.core import generate as gen  # noqa: E402
from lvs_jax.core import model as model_lib  # noqa: E402
from lvs_jax.io import registry  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Named model or path.")
flags.DEFINE_integer("batch", 16, "Prompts per batch.")
flags.DEFINE_integer("seq", 64, "Tokens per prompt.")
flags.DEFINE_integer("new_tokens", 64, "Generated tokens per prompt.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch default).")


def _median_time(fn, repeats):
  fn()  # warm-up: compilation / allocator
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(_):
  import torch
  import transformers

  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  m = registry.load_model(FLAGS.model)
  path, _ = registry.resolve(FLAGS.model)
  if path.endswith(".gguf"):
    tm = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  else:
    tm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  tm.eval()
  B, T, N = FLAGS.batch, FLAGS.seq, FLAGS.new_tokens
  toks = np.random.RandomState(0).randint(100, m.cfg.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones_like(toks)
  jt, jm = jnp.asarray(toks), jnp.asarray(mask)
  tt, tmask = torch.tensor(toks, dtype=torch.long), torch.tensor(mask)

  fwd = jax.jit(lambda p, t: model_lib.forward(p, t, m.cfg).logits)
  rows = []

  def jax_fwd():
    fwd(m.params, jt).block_until_ready()

  def torch_fwd():
    with torch.no_grad():
      tm(tt)

  rows.append((f"forward {B}x{T}", _median_time(jax_fwd, FLAGS.repeats), _median_time(torch_fwd, FLAGS.repeats)))

  def jax_gen():
    out, _ = gen.generate_tokens(m.params, jt, jm, m.cfg, max_new_tokens=N, eos_ids=(-1,))
    out.block_until_ready()

  def torch_gen():
    with torch.no_grad():
      tm.generate(tt, attention_mask=tmask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                  pad_token_id=m.tokenizer.pad_id)

  rows.append((f"generate {B}x{N} new", _median_time(jax_gen, FLAGS.repeats),
               _median_time(torch_gen, FLAGS.repeats)))

  dev = jax.devices()[0]
  print(f"\nmodel={FLAGS.model} device={dev.platform}:{dev.device_kind} jax={jax.__version__} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} dtype=float32")
  print(f"{'workload':<24}{'lvs_jax s':>12}{'torch s':>12}{'torch/lvs_jax':>16}")
  for name, j, t in rows:
    print(f"{name:<24}{j:>12.3f}{t:>12.3f}{t / j:>16.2f}")


if __name__ == "__main__":
  app.run(main)
