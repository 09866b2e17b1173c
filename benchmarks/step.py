r"""Train-step throughput and MFU of a 0.16B-shaped Transfusion on this machine, against the same
run's measured matmul peak, with a profile of where the step's time goes.

  python benchmarks/step.py [--seq_len 1024] [--rows 2] [--steps 3] [--dtypes float32,bfloat16]
      [--attention chunked|dense|dot_product] [--remat dots_saveable|none|full]

Runs on one device (XLA uses every core); prints a table and writes benchmarks/results/step.json.
"""
import argparse
import collections
import glob
import json
import os
import re
import statistics
import tempfile
import time

import jax
import numpy as np

from tfusion import config as config_lib, diffusion, flops, sharding, spec as spec_lib
from tfusion.data import sequence
from tfusion.training import optim, state as state_lib, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = sequence.SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)


def benchmark_config(seq_len, rows, dtype, attention="dense", remat="none"):
  c = config_lib.load_experiment(os.path.join(REPO, "experiments", "transfusion_paper.py:size=160m"))
  c.seq_len, c.batch_size, c.total_steps = seq_len, rows, 1000
  c.model.dtype, c.model.remat_policy, c.model.attention = dtype, remat, attention
  c.mesh.ici_data_parallelism, c.mesh.ici_fsdp_parallelism = 1, 1
  spec_lib.resolve(c)
  return c


def packed_batch(layout, rows, vocab, seed=0):
  """Rows half text, half image-caption documents (the paper's 1:1 mix), like the real pipeline's."""
  rng = np.random.default_rng(seed)
  built = []
  for _ in range(rows):
    row = sequence.RowBuilder(layout, SPECIAL, 1000)
    while row.room > 0:
      image = sequence.image_caption_document(rng.integers(6, vocab, 20).tolist(),
                                              rng.standard_normal(layout.latent_shape).astype(np.float32),
                                              rng.random() < 0.8, SPECIAL, 1000, 500)
      if row.length < layout.seq_len // 2 and row.fits(image):
        row.add(image)
      else:
        row.add([sequence.TextPiece(rng.integers(6, vocab, row.room).astype(np.int32))])
    built.append(row.arrays())
  return {k: np.stack([r[k] for r in built]) for k in built[0]}


def op_category(name):
  """Coarse class of an XLA CPU thunk from its name."""
  for category, pattern in (("matmul (dot / YNNPACK)", r"dot|gemm|matmul|onednn|ynn|xnn|conv"),
                            ("copy / transpose / broadcast", r"copy|transpose|broadcast|gather|scatter|slice|concat|pad"),
                            ("elementwise + reduce fusions", r"fusion|reduce|add|multiply|exp|select|compare"),
                            ("loops / control", r"while|call|conditional|tuple")):
    if re.search(pattern, name, re.IGNORECASE):
      return category
  return "other"


def profile_step(run, state, batch):
  """({category: seconds}, [(op, seconds)] top 15) of one step from a jax.profiler trace of the XLA CPU
  runtime's thunks."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      state, metrics = run(state, batch)
      jax.block_until_ready(metrics)
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  totals, by_op = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if "PjRtCpuClient" not in line.name and "XLAEigen" not in line.name:
        continue
      for event in line.events:
        if event.duration_ns and not event.name.startswith(("ThreadpoolListener", "ThunkExecutor", "end:")):
          totals[op_category(event.name)] += event.duration_ns / 1e9
          by_op[event.name] += event.duration_ns / 1e9
  return state, dict(totals), by_op.most_common(15)


def time_steps(config, steps):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  spec = spec_lib.resolve(config)
  model, layout = spec.transfusion(config.data.vocab_size), spec.layout
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  init = sequence.dummy_batch(1, layout)
  state, shardings = state_lib.create_train_state(model, tx, init, jax.random.key(0), mesh)
  run = step_lib.jit_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule,
                                alpha_bar=diffusion.make_alpha_bar("cosine", 1000), loss_weight=5.0,
                                train_key=jax.random.key(1))
  batch = jax.device_put(packed_batch(layout, config.batch_size, config.data.vocab_size),
                         sharding.batch_sharding(mesh))
  step_flops = flops.train_flops(model, state.params, sequence.model_inputs(batch))
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    state, metrics = run(state, batch)
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - start
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = run(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    state, profile, top_ops = profile_step(run, state, batch)
  elements = int((batch["segment_ids"] > 0).sum())
  return dict(step_seconds=statistics.median(times), step_seconds_all=times, first_step_seconds=compile_and_first,
              model_tflops_per_step=step_flops / 1e12, elements_per_step=elements,
              loss=float(metrics["loss"]), profile_seconds=profile, top_ops=top_ops)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--rows", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--attention", default="chunked", choices=("dense", "chunked", "dot_product"))
  parser.add_argument("--remat", default="dots_saveable", choices=("none", "full", "dots_saveable"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "step.json"))
  args = parser.parse_args()

  results = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "seq_len": args.seq_len,
             "rows": args.rows, "attention": args.attention, "remat": args.remat, "runs": {}}
  peak = lambda dtype: flops.measured_matmul_tflops.__wrapped__(dtype, size=4096, repeats=5)  # noqa: E731
  for dtype in args.dtypes.split(","):
    # The machine is shared and its speed drifts: time the matmul peak right before and after the
    # steps and divide by their mean.
    before = peak(dtype)
    r = time_steps(benchmark_config(args.seq_len, args.rows, dtype, args.attention, args.remat), args.steps)
    r["matmul_peak_tflops_before_after"] = [before, peak(dtype)]
    r["matmul_peak_tflops"] = statistics.mean(r["matmul_peak_tflops_before_after"])
    r["achieved_tflops"] = r["model_tflops_per_step"] / r["step_seconds"]
    r["mfu"] = r["achieved_tflops"] / r["matmul_peak_tflops"]
    r["elements_per_sec"] = r["elements_per_step"] / r["step_seconds"]
    results["runs"][dtype] = r

  print(f"0.16B-shaped Transfusion, seq {args.seq_len} x {args.rows} rows, attention {args.attention}, remat "
        f"{args.remat}, 1 {results['device']} device, {results['cpu_count']} cores")
  print(f"{'dtype':<10}{'s/step':>9}{'elem/s':>9}{'TFLOP/step':>11}{'TFLOP/s':>9}{'peak':>8}{'MFU':>7}")
  for dtype, r in results["runs"].items():
    print(f"{dtype:<10}{r['step_seconds']:>9.2f}{r['elements_per_sec']:>9.0f}{r['model_tflops_per_step']:>11.3f}"
          f"{r['achieved_tflops']:>9.3f}{r['matmul_peak_tflops']:>8.3f}{r['mfu']:>7.1%}")
  for dtype, r in results["runs"].items():
    total = sum(r["profile_seconds"].values())
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(r["profile_seconds"].items(), key=lambda kv: -kv[1]))
    print(f"profile {dtype}: {shares} (of {total:.2f} s thread time)")
  for dtype, r in results["runs"].items():
    print(f"matmul peak {dtype} before / after the steps: "
          + " / ".join(f"{p:.3f}" for p in r["matmul_peak_tflops_before_after"]) + " TFLOP/s")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
