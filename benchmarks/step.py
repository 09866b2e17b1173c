r"""Train-step throughput and MFU of a 0.16B-shaped Transfusion (or an experiment's config) on this machine,
against the same run's measured matmul peak, with a profile of where the step's time goes.

  python benchmarks/step.py [--seq_len 1024] [--rows 2] [--steps 3] [--dtypes float32,bfloat16]
      [--attention chunked|dense|dot_product] [--attention_chunk 256] [--remat dots_saveable|none|full]
  python benchmarks/step.py --experiment experiments/shapes_latent.py [--steps 3] [--set model.unet_skip_empty_slots=False]

Runs on one device (XLA uses every core); prints a table and writes benchmarks/results/step.json. With
--experiment (a path as --config takes it, "experiments/x.py" or "experiments/x.py:arg") it times that config's
train step (model, batch_size, seq_len, image slots per row, EMA, losses) on synthetic rows of its layout
(random latents: a VAE codec needs no trained VAE) and writes benchmarks/results/step_<x>.json; --seq_len,
--rows, --dtypes, --attention, --attention_chunk and --remat, when given, override its fields; --set FIELD=VALUE overrides any field.

  python benchmarks/step.py --variant chunk256 model.attention_chunk=256 --variant chunk512 model.attention_chunk=512

A/B comparison: each --variant (a label, then FIELD=VALUE overrides on top of the shape and --set) is built in this
one process, and their steps alternate, each divided by the matmul peak (in the variant's dtype: float32 for the
0.16B shape, the experiment's with --experiment, unless --set or the variant sets model.dtype) timed just before
it. The shared machine's speed drifts by minutes, so per-step pairs are steadier than one process per variant.
Prints the medians and writes benchmarks/results/step_compare.json.
"""
import argparse
import ast
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

from tfusion import config as config_lib, flops, sharding, spec as spec_lib
from tfusion.data import sequence
from tfusion.training import optim, state as state_lib, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_160M = os.path.join(REPO, "experiments", "transfusion_paper.py:size=160m")
SHAPE_DEFAULTS = dict(seq_len=1024, rows=2, dtypes="float32,bfloat16", attention="chunked", attention_chunk=256,
                      remat="dots_saveable")
SPECIAL = sequence.SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)


def benchmark_config(experiment, seq_len=None, rows=None, attention=None, remat=None, overrides=(), attention_chunk=None):
  """The config of `experiment` (a load_experiment path) on one device, with the fields given overridden;
  overrides: "dotted.field=value" strings (value a Python literal, or a string)."""
  c = config_lib.load_experiment(experiment)
  for node, field, value in ((c, "seq_len", seq_len), (c, "batch_size", rows), (c.model, "attention", attention),
                             (c.model, "attention_chunk", attention_chunk), (c.model, "remat_policy", remat)):
    if value is not None:
      node[field] = value
  c = with_overrides(c, overrides)
  c.mesh.ici_data_parallelism, c.mesh.ici_fsdp_parallelism = 1, 1
  spec_lib.resolve(c)
  return c


def with_overrides(config, overrides):
  """A copy of config with "dotted.field=value" strings applied (value a Python literal, or a string)."""
  c = config.copy_and_resolve_references()
  for override in overrides:
    dotted, _, text = override.partition("=")
    *path, field = dotted.split(".")
    node = c
    for name in path:
      node = node[name]
    if field not in node:
      raise ValueError(f"{override}: the config has no field {dotted!r}")
    try:
      node[field] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      node[field] = text
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


def compiled_step(config):
  """(run, state, batch, mesh, model FLOPs per step, seconds of the first step, its loss) of config's train step on
  one device, after that first step (which compiles it)."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  spec = spec_lib.resolve(config)
  model, layout = spec.transfusion(config.data.vocab_size), spec.layout
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  init = sequence.dummy_batch(1, layout)
  state, shardings = state_lib.create_train_state(model, tx, init, jax.random.key(0), mesh,
                                                  ema=config.ema_decay > 0)
  run = step_lib.jit_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule, alpha_bar=spec.alpha_bar,
                                loss_weight=config.diffusion.loss_weight, min_snr_gamma=config.diffusion.min_snr_gamma,
                                z_loss_weight=config.z_loss_weight, ema_decay=config.ema_decay,
                                microbatches=config.microbatches, train_key=jax.random.key(1))
  batch = jax.device_put(packed_batch(layout, config.batch_size, config.data.vocab_size),
                         sharding.batch_sharding(mesh))
  step_flops = flops.train_flops(model, state.params, sequence.model_inputs(batch))
  state, seconds, loss = timed_step(run, state, batch, mesh)
  return run, state, batch, mesh, step_flops, seconds, loss


def timed_step(run, state, batch, mesh):
  """(state, seconds, loss) of one step."""
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    state, metrics = run(state, batch)
    jax.block_until_ready(metrics)
  return state, time.perf_counter() - start, float(metrics["loss"])


def time_steps(config, steps):
  run, state, batch, mesh, step_flops, compile_and_first, loss = compiled_step(config)
  times = []
  for _ in range(steps):
    state, seconds, loss = timed_step(run, state, batch, mesh)
    times.append(seconds)
  with jax.set_mesh(mesh):
    state, profile, top_ops = profile_step(run, state, batch)
  elements = int((batch["segment_ids"] > 0).sum())
  return dict(step_seconds=statistics.median(times), step_seconds_all=times, first_step_seconds=compile_and_first,
              model_tflops_per_step=step_flops / 1e12, elements_per_step=elements,
              loss=loss, profile_seconds=profile, top_ops=top_ops)


def matmul_peak(dtype, repeats=5):
  """This machine's TFLOP/s on a 4096^2 matmul now (not cached)."""
  return flops.measured_matmul_tflops.__wrapped__(dtype, size=4096, repeats=repeats)


def step_after_peak(run, state, batch, mesh, dtype):
  """(state, seconds, peak): one step, timed right after a matmul peak in `dtype`."""
  peak = matmul_peak(dtype, repeats=3)
  state, seconds, _ = timed_step(run, state, batch, mesh)
  return state, seconds, peak


def median_ratio(model_tflops, pairs):
  """The median over steps of model TFLOP/s over the peak timed just before; pairs: [(seconds, peak)]."""
  return statistics.median(model_tflops / seconds / peak for seconds, peak in pairs)


def compare(base, variants, steps):
  """{label: figures} of interleaved steps: round by round, each variant's step is timed right after a matmul peak
  in its dtype, and its ratio is model FLOPs / seconds / that peak. variants: [(label, overrides)]."""
  labels = [label for label, _ in variants]
  if steps < 1 or len(set(labels)) != len(labels) or any("=" in label for label in labels):
    raise ValueError(f"--variant: give distinct labels (without '='), each followed by FIELD=VALUE overrides, "
                     f"and --steps >= 1; got labels {labels}, steps {steps}")
  configs = [with_overrides(base, overrides) for _, overrides in variants]
  for config in configs:               # every variant's config is checked before any is compiled
    spec_lib.resolve(config)
  built = {}
  for (label, overrides), config in zip(variants, configs):
    run, state, batch, mesh, step_flops, first, loss = compiled_step(config)
    built[label] = dict(run=run, state=state, batch=batch, mesh=mesh, dtype=config.model.dtype, overrides=overrides,
                        model_tflops_per_step=step_flops / 1e12, first_step_seconds=first, loss=loss, pairs=[])
  for _ in range(steps):
    for b in built.values():
      b["state"], seconds, peak = step_after_peak(b["run"], b["state"], b["batch"], b["mesh"], b["dtype"])
      b["pairs"].append((seconds, peak))
  results = {}
  for label, b in built.items():
    seconds, peaks = zip(*b["pairs"])
    results[label] = dict(overrides=b["overrides"], dtype=b["dtype"], model_tflops_per_step=b["model_tflops_per_step"],
                          first_step_seconds=b["first_step_seconds"], first_loss=b["loss"],
                          step_seconds_all=list(seconds), matmul_peak_tflops_all=list(peaks),
                          step_seconds=statistics.median(seconds), matmul_peak_tflops=statistics.median(peaks),
                          mfu=median_ratio(b["model_tflops_per_step"], b["pairs"]))
  return results


def print_comparison(base, results):
  print(f"interleaved steps, 1 {jax.devices()[0].device_kind} device, {os.cpu_count()} cores, "
        f"seq {base.seq_len} x {base.batch_size} rows (unless a variant sets them); ratio: the median over steps of "
        f"model FLOP/s / the peak timed just before (not s/step and peak's medians)")
  print(f"{'variant':<24}{'dtype':<10}{'s/step':>8}{'peak':>8}{'ratio':>8}{'1st loss':>10}  steps (s)")
  for label, r in results.items():
    steps = " ".join(f"{s:.2f}" for s in r["step_seconds_all"])
    print(f"{label:<24}{r['dtype']:<10}{r['step_seconds']:>8.2f}{r['matmul_peak_tflops']:>8.3f}{r['mfu']:>8.1%}"
          f"{r['first_loss']:>10.4f}  {steps}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experiment", help='time this config ("experiments/x.py" or "experiments/x.py:arg"), not the '
                                           "0.16B shape; the shape flags then default to its fields")
  parser.add_argument("--seq_len", type=int, help="default 1024 (0.16B shape)")
  parser.add_argument("--rows", type=int, help="default 2 (0.16B shape)")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtypes", help="default float32,bfloat16 (0.16B shape)")
  parser.add_argument("--attention", choices=("dense", "chunked", "dot_product"), help="default chunked (0.16B shape)")
  parser.add_argument("--attention_chunk", type=int, help="block length of chunked attention: the blocks the mask "
                                                           "hides are skipped (default 256, 0.16B shape)")
  parser.add_argument("--remat", choices=("none", "full", "dots_saveable"), help="default dots_saveable (0.16B shape)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set model.unet_skip_empty_slots=False")
  parser.add_argument("--variant", action="append", nargs="+", metavar="LABEL [FIELD=VALUE ...]",
                      help="compare variants, steps interleaved in one process (see above); give it twice or more")
  parser.add_argument("--out", help="default benchmarks/results/step.json (0.16B shape) or step_<experiment>.json; "
                                    "with --variant, step_compare.json")
  args = parser.parse_args()
  if args.variant and args.dtypes:
    parser.error("--variant: set model.dtype=... in a variant instead of --dtypes")
  if not args.experiment:
    vars(args).update({k: v for k, v in SHAPE_DEFAULTS.items() if getattr(args, k) is None and not
                       (k == "dtypes" and args.variant)})

  name = os.path.splitext(os.path.basename(args.experiment.partition(":")[0]))[0] if args.experiment else ""
  base = benchmark_config(args.experiment or PAPER_160M, args.seq_len, args.rows, args.attention, args.remat, args.set,
                          args.attention_chunk)
  machine_and_shape = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
                       "experiment": args.experiment, "overrides": args.set, "seq_len": base.seq_len,
                       "rows": base.batch_size}
  if args.variant:
    if not args.experiment and not any(o.startswith("model.dtype=") for o in args.set):
      base.model.dtype = "float32"
    results = {**machine_and_shape, "steps": args.steps,
               "variants": compare(base, [(label, overrides) for label, *overrides in args.variant], args.steps)}
    print_comparison(base, results["variants"])
    write_json(results, args.out or os.path.join(REPO, "benchmarks", "results", "step_compare.json"))
    return
  results = {**machine_and_shape,
             "image_slots_per_row": spec_lib.resolve(base).layout.max_images, "attention": base.model.attention,
             "attention_chunk": base.model.attention_chunk,
             "remat": base.model.remat_policy, "runs": {}}
  for dtype in (args.dtypes or base.model.dtype).split(","):
    config = base.copy_and_resolve_references()
    config.model.dtype = dtype
    # The machine is shared and its speed drifts: time the matmul peak right before and after the
    # steps and divide by their mean.
    before = matmul_peak(dtype)
    r = time_steps(config, args.steps)
    r["matmul_peak_tflops_before_after"] = [before, matmul_peak(dtype)]
    r["matmul_peak_tflops"] = statistics.mean(r["matmul_peak_tflops_before_after"])
    r["achieved_tflops"] = r["model_tflops_per_step"] / r["step_seconds"]
    r["mfu"] = r["achieved_tflops"] / r["matmul_peak_tflops"]
    r["elements_per_sec"] = r["elements_per_step"] / r["step_seconds"]
    results["runs"][dtype] = r

  print(f"{args.experiment or '0.16B-shaped Transfusion'}, seq {base.seq_len} x {base.batch_size} rows, "
        f"{results['image_slots_per_row']} image slots per row, attention {base.model.attention} "
        f"(chunk {base.model.attention_chunk}), remat "
        f"{base.model.remat_policy}, 1 {results['device']} device, {results['cpu_count']} cores")
  print(f"{'dtype':<10}{'s/step':>9}{'elem/s':>9}{'GFLOP/step':>11}{'TFLOP/s':>9}{'peak':>8}{'MFU':>7}")
  for dtype, r in results["runs"].items():
    print(f"{dtype:<10}{r['step_seconds']:>9.2f}{r['elements_per_sec']:>9.0f}{r['model_tflops_per_step'] * 1e3:>11.1f}"
          f"{r['achieved_tflops']:>9.3f}{r['matmul_peak_tflops']:>8.3f}{r['mfu']:>7.1%}")
  for dtype, r in results["runs"].items():
    total = sum(r["profile_seconds"].values())
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(r["profile_seconds"].items(), key=lambda kv: -kv[1]))
    print(f"profile {dtype}: {shares} (of {total:.2f} s thread time)")
  for dtype, r in results["runs"].items():
    print(f"matmul peak {dtype} before / after the steps: "
          + " / ".join(f"{p:.3f}" for p in r["matmul_peak_tflops_before_after"]) + " TFLOP/s")
  write_json(results, args.out or os.path.join(REPO, "benchmarks", "results", f"step_{name}.json" if name else "step.json"))


def write_json(results, out):
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
