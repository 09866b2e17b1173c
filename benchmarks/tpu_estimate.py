r"""Estimated TPU step time and MFU of tfusion's train step next to a plain Llama's, from XLA's cost model.

  pip install -e .[tpu]      # the TPU compiler (libtpu) runs on any host, compile-only
  python benchmarks/tpu_estimate.py [--plans 7b@v5:4x4x4 ...] [--attention chunked flash] [--out ...]

Every figure here is an ESTIMATE of XLA's TPU cost model (`compiled.cost_analysis()["optimal_seconds"]`,
per device), not a measurement: use it to compare variants compiled in one run. For each plan (a paper
size on a TPU topology, the paper's batch of 512 rows of 4096) it compiles, for every attention
implementation asked for, tfusion's full train step (forward, backward, AdamW), and for every attention
of --llama_attention a plain Llama step of the same size, batch and sequence (`benchmarks/plain_llama.py`:
text only, causal; dense einsum attention, as the issue's reference, and the same flash kernel, so one
ratio compares like with like). Both use the config's remat policy (`--remat` overrides it).

The cost model prices a loop body once, so the layers are unrolled; to keep compile time down each
model is compiled with 1 and 2 layers and the compiler FLOPs and seconds are extrapolated linearly to
the real depth: f(n) = f(1) + (n - 1) * (f(2) - f(1)). Peak memory comes from a third compile, of the
full-depth step with its layers scanned (the program that trains).

Model FLOPs per device, the same for both models: 6 * N * T + 6 * n_layers * d_model * seq * T, with N
the matmul parameters (all but the input embedding), T the tokens per device, and attention counted
causal (half of the seq x seq scores; tfusion's extra image blocks and its linear patch layers add
< 0.1%). Estimated MFU = model FLOPs / (estimated seconds * the chip's dense bf16 peak).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from tfusion import aot, config as config_lib, flops, sharding, spec as spec_lib
from tfusion.models import transformer
from tfusion.training import optim

import plain_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PLANS = ("760m@v5:4x4x4", "7b@v5:4x4x4", "7b@v6e:16x16")
CHIP = {"v5": "v5p", "v6e": "v6e"}


def extrapolate(one: float, two: float, layers: int) -> float:
  return one + (layers - 1) * (two - one)


def model_flops_per_device(config, num_devices: int) -> float:
  """6 N T + causal attention (see the module docstring)."""
  m = config.model
  layer = 4 * m.d_model * m.d_model + 3 * m.d_model * m.mlp_dim
  matmul_params = m.num_layers * layer + m.d_model * config.data.vocab_size   # + the LM head
  tokens = config.batch_size * config.seq_len / num_devices
  return 6 * matmul_params * tokens + 6 * m.num_layers * m.d_model * config.seq_len * tokens


def tfusion_step(config, devices, layers: int) -> dict:
  """Figures of tfusion's step with `layers` layers, unrolled; 0 layers: the config's depth, scanned (as trained)."""
  config = config.copy_and_resolve_references()
  config.model.num_layers = layers or config.model.num_layers
  f = aot.compile_train_step(config, devices, unroll_layers=layers > 0, count_model_flops=False)
  return {"compiler_flops": f["compiler_flops"], "seconds": f["estimated_seconds"], "peak_bytes": f["peak_bytes"]}


def llama_step(config, devices, layers: int) -> dict:
  """Figures of the plain Llama's step (config.model.attention: dense or flash), as tfusion_step."""
  tcfg = spec_lib.resolve(config).model.transformer
  tcfg = dataclasses.replace(tcfg, num_layers=layers or tcfg.num_layers)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh(config.mesh, devices)
  model = plain_llama.PlainLlama(tcfg, config.data.vocab_size, scan_layers=layers == 0)
  return compiled_figures(plain_llama.compile_train_step(model, tx, config.batch_size, config.seq_len, mesh))


def compiled_figures(compiled) -> dict:
  """Compiler FLOPs, the cost model's seconds (nan if it gives none) and peak bytes of a compiled program."""
  cost = compiled.cost_analysis()
  return {"compiler_flops": float(cost["flops"]), "seconds": float(cost.get("optimal_seconds", float("nan"))),
          "peak_bytes": float(compiled.memory_analysis().peak_memory_in_bytes)}


def timed(what: str, compile_step, *args) -> dict:
  start = time.time()
  figures = compile_step(*args)
  print(f"  compiled {what} in {time.time() - start:.0f} s: {figures}", file=sys.stderr, flush=True)
  return figures


def estimate(label: str, compile_step, config, devices, memory: bool = True) -> dict:
  """FLOPs and seconds extrapolated from 1 and 2 unrolled layers; peak memory of the full-depth scanned step
  (nan without `memory`: one compile fewer)."""
  start = time.time()
  one, two, full = (timed(f"{label}, {layers or 'all'} layers", compile_step, config, devices, layers)
                    if layers or memory else {"peak_bytes": float("nan")} for layers in (1, 2, 0))
  n = config.model.num_layers
  row = {key: extrapolate(one[key], two[key], n) for key in ("compiler_flops", "seconds")}
  if min(one["seconds"], two["seconds"]) < 0:      # an op the cost model cannot price (docs/scaling.md)
    print(f"  {label}: XLA's cost model returned a negative optimal_seconds (an op it cannot price; on v6e "
          "every Pallas call): no time or MFU for this row", file=sys.stderr, flush=True)
    row["seconds"] = float("nan")
  kind = devices[0].device_kind
  peak = flops.PEAK_TFLOPS[kind] * 1e12
  model = model_flops_per_device(config, len(devices))
  return {"label": label, "device_kind": kind, "num_devices": len(devices), "layers": n,
          "batch": config.batch_size, "seq_len": config.seq_len, "model_flops": model, **row,
          "peak_bytes": full["peak_bytes"], "estimated_mfu": model / (row["seconds"] * peak),
          "peak_tflops": peak / 1e12, "hbm_bytes": aot.DEVICE_MEMORY_GIB.get(kind, 0.0) * 2**30,
          "one_layer": one, "two_layers": two, "scanned": full, "compile_seconds": time.time() - start}


def with_attention(config, attention: str):
  """A copy of config with attention "name" or "name:block" (model.attention, model.attention_chunk)."""
  variant = config.copy_and_resolve_references()
  variant.model.attention, _, block = attention.partition(":")
  variant.model.attention_chunk = int(block or variant.model.attention_chunk)
  spec_lib.resolve(variant)                          # the config's and the model's checks, before any compile
  return variant


def attention_label(config) -> str:
  chunk = "" if config.model.attention == "dense" else f" {config.model.attention_chunk}"
  return f"{config.model.attention} attention{chunk}, remat {config.model.remat_policy}"


def run_plan(plan: str, attentions: list[str], out: str, batch_size: int = 0, seq_len: int = 0,
             llama_attentions: tuple[str, ...] = ("dense",), memory: bool = True, remat: str = "") -> list[dict]:
  """The rows of one plan, each printed and saved to `out` as soon as it is compiled."""
  size, topology = plan.split("@")
  config = config_lib.load_experiment(os.path.join(REPO, "experiments", f"transfusion_paper.py:size={size}"))
  config.batch_size = batch_size or config.batch_size
  config.seq_len = seq_len or config.seq_len
  config.model.remat_policy = remat or config.model.remat_policy
  devices = aot.topology_devices(topology)
  variants = [("plain Llama", llama_step, with_attention(config, a)) for a in llama_attentions]
  variants += [("tfusion", tfusion_step, with_attention(config, a)) for a in attentions]
  rows = []
  for model, compile_step, variant in variants:
    label = f"{model} {size}, {attention_label(variant)}"
    row = dict(estimate(label, compile_step, variant, devices, memory), plan=plan, topology=topology, model=model,
               attention=variant.model.attention, remat=variant.model.remat_policy)
    rows = save(out, row)
    print(format_row(row, rows), flush=True)
  return rows


def save(out: str, row: dict, key=("plan", "label")) -> list[dict]:
  """Adds `row` to the JSON list at `out`, replacing the row with the same `key` fields; returns the list."""
  rows = json.load(open(out)) if os.path.exists(out) else []
  rows = [r for r in rows if [r.get(k) for k in key] != [row[k] for k in key]] + [row]
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(rows, f, indent=2)
  return rows


def ratio_to_llama(row: dict, rows: list[dict], attention: str) -> float:
  """The row's estimated MFU over that of the plain Llama of the same plan and remat policy whose attention
  is `attention` ("dense", or "same": the row's own); nan if that Llama is not compiled yet."""
  wanted = row.get("attention") if attention == "same" else attention
  llama = [r for r in rows if r.get("model") == "plain Llama" and r.get("attention") == wanted
           and (r["plan"], r.get("remat")) == (row["plan"], row.get("remat"))]
  return row["estimated_mfu"] / llama[0]["estimated_mfu"] if llama else float("nan")


HEADER = (f"{'plan':<14}{'model':<56}{'model TFLOP':>12}{'XLA TFLOP':>10}{'est. s':>8}{'est. MFU':>9}"
          f"{'x Llama same attn':>18}{'x Llama dense':>14}{'peak GiB':>9}{'compile s':>10}")


def attention_alone(attention: str, size: str, topology: str, rows: int, seq_len: int) -> dict:
  """Compiler FLOPs, estimated seconds and peak bytes of one layer's self-attention, forward and backward (no
  remat), compiled alone for one chip of `topology`: `rows` rows of seq_len, the size's heads, bf16. The ids
  are abstract, so the figures hold for any document layout: the cost model cannot see which blocks a row
  skips (a cond's predicate), and prices the flash kernel from the causal fraction it declares."""
  config = with_attention(config_lib.load_experiment(
      os.path.join(REPO, "experiments", f"transfusion_paper.py:size={size}")), attention)
  cfg = spec_lib.resolve(config).model.transformer
  q = jax.ShapeDtypeStruct((rows, seq_len, cfg.num_heads, cfg.d_model // cfg.num_heads), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)

  def forward_and_backward(q, k, v, segment_ids, image_ids, dout):   # dout: a cotangent XLA cannot simplify away
    attention = lambda q, k, v: transformer.self_attention(cfg, q, k, v, segment_ids, image_ids)  # noqa: E731
    out, pullback = jax.vjp(attention, q, k, v)
    return out, pullback(dout)

  single = jax.sharding.SingleDeviceSharding(aot.topology_devices(topology)[0])
  compiled = jax.jit(forward_and_backward, in_shardings=single).lower(q, q, q, ids, ids, q).compile()
  label = config.model.attention + ("" if config.model.attention == "dense" else f" {config.model.attention_chunk}")
  return {"plan": f"{size}@{topology}", "attention": label, "rows": rows, "seq_len": seq_len,
          **compiled_figures(compiled)}


def format_row(row: dict, rows: list[dict]) -> str:
  return (f"{row['plan']:<14}{row['label']:<56}{row['model_flops'] / 1e12:>12.1f}{row['compiler_flops'] / 1e12:>10.1f}"
          f"{row['seconds']:>8.3f}{row['estimated_mfu']:>9.1%}{ratio_to_llama(row, rows, 'same'):>18.2f}"
          f"{ratio_to_llama(row, rows, 'dense'):>14.2f}{row['peak_bytes'] / 2**30:>9.1f}{row['compile_seconds']:>10.0f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--plans", nargs="*", default=list(DEFAULT_PLANS), help="size@topology, e.g. 7b@v5:4x4x4")
  parser.add_argument("--attention", nargs="*", default=["chunked", "flash:512"],
                      help="tfusion's model.attention values, each optionally :block (model.attention_chunk)")
  parser.add_argument("--batch_size", type=int, default=0, help="rows per step (default: the paper's 512)")
  parser.add_argument("--seq_len", type=int, default=0, help="row length (default: the paper's 4096)")
  parser.add_argument("--out", help="default benchmarks/results/tpu_estimate.json, or with --attention_alone "
                                    "tpu_attention_alone.json")
  parser.add_argument("--llama_attention", nargs="*", default=["dense", "flash:512"],
                      help="the plain Llama's attentions (dense, flash[:block]); none: tfusion rows only")
  parser.add_argument("--remat", default="", help="model.remat_policy of every row (default: the config's, full)")
  parser.add_argument("--no_memory", action="store_true", help="skip the full-depth compile that gives peak memory")
  parser.add_argument("--attention_alone", action="store_true",
                      help="instead: one layer's attention (forward and backward, no remat) of each --attention, "
                           "compiled for one chip of each plan's topology with that chip's rows of the batch")
  args = parser.parse_args()
  results = os.path.join(REPO, "benchmarks", "results")
  if args.attention_alone:
    print("XLA cost-model ESTIMATES for one chip (not measurements): one layer's attention, forward and backward")
    for plan in args.plans:
      size, topology = plan.split("@")
      rows = (args.batch_size or 512) // len(aot.topology_devices(topology))     # the paper's 512 rows
      for attention in args.attention:
        row = attention_alone(attention, size, topology, rows, args.seq_len or 4096)
        save(args.out or os.path.join(results, "tpu_attention_alone.json"), row, key=("plan", "attention", "rows"))
        print(f"{plan:<14}{row['attention']:<12}{rows:>3} rows of {row['seq_len']}{row['compiler_flops'] / 1e12:>8.2f} "
              f"TFLOP{row['seconds']:>9.4f} s{row['peak_bytes'] / 2**30:>7.1f} GiB", flush=True)
    return
  print("XLA cost-model ESTIMATES per device (not measurements); layers extrapolated from 1 and 2 unrolled")
  print(HEADER, flush=True)
  for plan in args.plans:
    run_plan(plan, args.attention, args.out or os.path.join(results, "tpu_estimate.json"), args.batch_size,
             args.seq_len, tuple(args.llama_attention), memory=not args.no_memory, remat=args.remat)


if __name__ == "__main__":
  main()
