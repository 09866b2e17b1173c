r"""The train step's matmuls, each timed alone at its own shape: how much of the step they are, and which
shapes run far below the 4096^2 matmul peak that benchmarks/step.py divides by.

  python benchmarks/step_dots.py [--seq_len 1024] [--rows 2] [--attention_chunk 256] [--dtype float32]
      [--set FIELD=VALUE ...]

The step is benchmarks/step.py's (0.16B shape, chunked attention, remat dots_saveable). Its jaxpr is walked
for every dot_general, counted as many times as it runs: times the length of each enclosing scan; of a
platform-dependent cond, the branch of this backend; of chunked attention's per-block-pair conds, the
computing branch times the fraction of block pairs the batch leaves visible. A matmul under any other cond
or in a while loop is refused (its count is unknown); convolutions (a U-Net encoder) are not counted.
Each distinct matmul is jitted alone and timed (best of 5; single shapes still vary by 10-40% between runs
here, so read the sums). Then the step itself is timed, each step right after a matmul peak, and its ratio
is the median of the per-step ratios. Prints the table and writes benchmarks/results/step_dots.json.
"""
import argparse
import collections
import os
import statistics

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

import step as step_benchmark
from tfusion import flops, masks

Dot = collections.namedtuple("Dot", "lhs rhs dtypes dimension_numbers attention")


def step_dots(jaxpr, visible_fraction: float) -> collections.Counter:
  """{Dot: times run per step} of a closed jaxpr (see the module docstring)."""
  counts = collections.Counter()

  def walk(jaxpr, times, in_attention):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        lhs, rhs = (v.aval for v in eqn.invars)
        (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
        if in_attention and len(lhs_batch) != 2:
          raise ValueError(f"a matmul under a cond that is not an attention block: {lhs.shape} x {rhs.shape}")
        counts[Dot(lhs.shape, rhs.shape, (str(lhs.dtype), str(rhs.dtype)), eqn.params["dimension_numbers"],
                   in_attention)] += times
      if eqn.primitive.name == "while" and "dot_general" in str(eqn.params["body_jaxpr"]):
        raise ValueError("a matmul in a while loop: its trip count is unknown")
      if eqn.primitive.name == "cond":
        platforms = eqn.params.get("branches_platforms")
        if platforms:
          ours = [b for b, p in zip(eqn.params["branches"], platforms) if p and jax.default_backend() in p]
          default = [b for b, p in zip(eqn.params["branches"], platforms) if p is None]
          walk((ours or default)[0].jaxpr, times, in_attention)
        else:
          for branch in eqn.params["branches"]:
            walk(branch.jaxpr, times * visible_fraction, True)
        continue
      inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub, inner, in_attention)

  walk(jaxpr.jaxpr, 1.0, False)
  return counts


def dot_flops(dot: Dot) -> float:
  (_, rhs_contract), (_, rhs_batch) = dot.dimension_numbers
  rhs_free = [d for i, d in enumerate(dot.rhs) if i not in rhs_contract and i not in rhs_batch]
  return 2.0 * np.prod(dot.lhs) * np.prod(rhs_free)


def time_dot(dot: Dot) -> float:
  """Best of 5 seconds of the matmul alone, float32 accumulation as in the model."""
  a, b = (jnp.ones(shape, dtype) for shape, dtype in zip((dot.lhs, dot.rhs), dot.dtypes))
  return flops.best_seconds(
      lambda a, b: jax.lax.dot_general(a, b, dot.dimension_numbers, preferred_element_type=jnp.float32), a, b)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--rows", type=int, default=2)
  parser.add_argument("--attention_chunk", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--out", default=os.path.join(step_benchmark.REPO, "benchmarks", "results", "step_dots.json"))
  args = parser.parse_args()
  config = step_benchmark.benchmark_config(step_benchmark.PAPER_160M, args.seq_len, args.rows, "chunked",
                                           "dots_saveable", args.set + [f"model.dtype={args.dtype}"],
                                           args.attention_chunk)
  run, state, batch, mesh, model_flops, _, _ = step_benchmark.compiled_step(config)
  visible = np.asarray(masks.visible_block_pairs(batch["segment_ids"], batch["image_ids"],
                                                 config.model.attention_chunk,
                                                 config.model.image_attention == "bidirectional"))
  with jax.set_mesh(mesh):
    counts = step_dots(jax.make_jaxpr(run)(state, batch), visible.mean())

  rows = []
  for dot, times in counts.items():
    seconds = time_dot(dot)
    rows.append(dict(lhs=dot.lhs, rhs=dot.rhs, dimension_numbers=str(dot.dimension_numbers),
                     attention_block=dot.attention, times=times, seconds_each=seconds, seconds=times * seconds,
                     tflops=dot_flops(dot) / seconds / 1e12))
  pairs = []
  for _ in range(args.steps):
    state, seconds, peak = step_benchmark.step_after_peak(run, state, batch, mesh, args.dtype)
    pairs.append((seconds, peak))
  steps, peaks = zip(*pairs)
  peak, step_seconds = statistics.median(peaks), statistics.median(steps)
  ratio = step_benchmark.median_ratio(model_flops / 1e12, pairs)
  for row in rows:
    row["of_peak"] = row["tflops"] / peak
  rows.sort(key=lambda r: -r["seconds"])
  attention = sum(r["seconds"] for r in rows if r["attention_block"])
  other = sum(r["seconds"] for r in rows if not r["attention_block"])
  result = dict(seq_len=config.seq_len, rows=config.batch_size, attention_chunk=config.model.attention_chunk,
                dtype=args.dtype, visible_block_pairs=f"{int(visible.sum())} of {visible.size}",
                matmul_peak_tflops=peak, step_seconds=step_seconds, step_seconds_all=steps, ratio=ratio,
                model_tflops_per_step=model_flops / 1e12, dots_seconds=attention + other,
                attention_block_dots_seconds=attention, other_dots_seconds=other, dots=rows)

  print(f"the 0.16B-shaped step's matmuls timed alone ({args.dtype}, seq {config.seq_len} x {config.batch_size}, "
        f"attention blocks of {config.model.attention_chunk}, {result['visible_block_pairs']} block pairs visible); "
        f"4096^2 peak {peak:.3f} TFLOP/s")
  print(f"{'lhs':<22}{'rhs':<22}{'runs':>7}{'s each':>9}{'s':>8}{'TFLOP/s':>9}{'of peak':>9}  attention block")
  for r in rows[:20]:
    print(f"{str(r['lhs']):<22}{str(r['rhs']):<22}{r['times']:>7.0f}{r['seconds_each'] * 1e3:>7.2f}ms{r['seconds']:>8.2f}"
          f"{r['tflops']:>9.3f}{r['of_peak']:>9.0%}  {'yes' if r['attention_block'] else ''}")
  print(f"matmuls alone: {attention + other:.2f} s (attention blocks {attention:.2f} s, the rest {other:.2f} s); the step: "
        f"{step_seconds:.2f} s, of which matmuls at their standalone speed {(attention + other) / step_seconds:.0%}")
  print(f"model FLOPs / step time / peak (median over steps): {ratio:.1%}; "
        f"if everything but the matmuls were free: {model_flops / 1e12 / (attention + other) / peak:.1%}")
  step_benchmark.write_json(result, args.out)


if __name__ == "__main__":
  main()
