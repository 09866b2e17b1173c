r"""Compile the full train step for a target mesh without running it; print its per-device memory and FLOPs.

  python -m tfusion.aot --config experiments/transfusion_paper.py:size=7b --topology v5p:4x4x8
  python -m tfusion.aot --config experiments/transfusion_paper.py:size=160m --topology cpu:8 --config.mesh.ici_tensor_parallelism=2

--topology is a TPU topology name (`v5p:4x4x8`, `v6e:16x16`, `v4:2x2x1`; needs the libtpu of
`pip install -e .[tpu]`, which compiles for TPUs on any host) or `cpu:N` (N fake CPU devices).
Nothing is allocated: the state and batch are abstract values with their shardings.
"""
import dataclasses
import json
import math

from absl import app, flags
import jax
from ml_collections import config_flags

from tfusion import flops, sharding, spec as spec_lib
from tfusion.data import sequence
from tfusion.training import optim, state as state_lib, step as step_lib

# Memory per device in GiB (HBM per chip on TPU), for the fits / does-not-fit line.
DEVICE_MEMORY_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5e": 16.0, "TPU v5": 95.74 * 1e9 / 2**30,
                     "TPU v5p": 95.74 * 1e9 / 2**30, "TPU v6 lite": 32.0, "TPU v6e": 32.0}


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Devices to compile for: abstract TPU devices of a topology, or the first N CPU devices."""
  if topology.startswith("cpu:"):
    count = int(topology[4:])
    if count > len(jax.devices("cpu")):
      raise ValueError(f"--topology {topology}: only {len(jax.devices('cpu'))} CPU devices exist (set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={count})")
    return jax.devices("cpu")[:count]
  from jax.experimental import topologies
  try:
    # v4 exposes two cores per chip unless they are fused into one device ("megacore"), as trained.
    extra = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}
    return topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=num_slices,
                                        **extra).devices
  except Exception as e:  # libtpu missing or an unknown name: both are user errors here
    raise ValueError(f"--topology {topology}: cannot describe this TPU topology ({type(e).__name__}: {e}). "
                     "Install the TPU compiler with `pip install -e .[tpu]`; names look like v5p:4x4x8.") from e


def _bytes_per_device(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_train_step(config, devices, unroll_layers: bool = False, count_model_flops: bool = True) -> dict:
  """AOT-compile the train step of `config` on a mesh over `devices`; returns per-device figures.

  compiler_flops and estimated_seconds are XLA's cost analysis (`optimal_seconds`: the compiler's
  estimate, not a measurement); it prices a loop body once, so they cover the whole step only with
  unroll_layers (straight-line layers, slower to compile).
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  spec = spec_lib.resolve(config)
  model, layout = spec.transfusion(config.data.vocab_size), spec.layout
  if unroll_layers:
    tcfg = dataclasses.replace(model.cfg.transformer, unroll_layers=True)
    model = model.clone(cfg=dataclasses.replace(model.cfg, transformer=tcfg))
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  init_batch = sequence.dummy_batch(1, layout)
  state, shardings = state_lib.abstract_train_state(model, tx, init_batch, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       jax.eval_shape(lambda: sequence.dummy_batch(config.batch_size, layout)))
  step = step_lib.jit_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule, alpha_bar=spec.alpha_bar,
                                 loss_weight=config.diffusion.loss_weight, z_loss_weight=config.z_loss_weight,
                                 train_key=jax.random.key(0), microbatches=config.microbatches)
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  model_flops = flops.train_flops(model, state.params, sequence.model_inputs(batch)) if count_model_flops else 0.0
  # The TPU compiler reports a heap-simulated peak; everything-live-at-once bounds it from above.
  live_bound = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes)
  peak = memory.peak_memory_in_bytes if devices[0].platform == "tpu" else live_bound
  kind = devices[0].device_kind
  return {
      "device_kind": kind, "num_devices": len(devices), "mesh": dict(mesh.shape),
      "params_bytes": _bytes_per_device(state.params),
      "optimizer_bytes": _bytes_per_device(state.opt_state),
      "batch_bytes": _bytes_per_device(batch),
      "temp_bytes": memory.temp_size_in_bytes,
      "argument_bytes": memory.argument_size_in_bytes,
      "peak_bytes": peak,
      "live_bound_bytes": live_bound,
      "device_memory_bytes": DEVICE_MEMORY_GIB.get(kind, 0.0) * 2**30,
      "model_tflops_per_device": model_flops / len(devices) / 1e12,
      "compiler_flops": float(cost["flops"]),
      "estimated_seconds": float(cost.get("optimal_seconds", float("nan"))),
      "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
  }


def report(figures: dict) -> str:
  def gib(b):
    return f"{b / 2**30:10.2f} GiB"
  rows = [("device", f"{figures['num_devices']} x {figures['device_kind']}, mesh {figures['mesh']}"),
          ("parameters (total)", f"{figures['parameters']:,}"),
          ("params / device", gib(figures["params_bytes"])),
          ("optimizer / device", gib(figures["optimizer_bytes"])),
          ("batch / device", gib(figures["batch_bytes"])),
          ("temporaries / device", gib(figures["temp_bytes"])),
          ("peak / device (compiler)", gib(figures["peak_bytes"])),
          ("arguments + temporaries", gib(figures["live_bound_bytes"])),
          ("model TFLOPs / device / step", f"{figures['model_tflops_per_device']:10.4g}")]
  if figures["device_memory_bytes"]:
    need = max(figures["peak_bytes"], figures["live_bound_bytes"])
    fits = "fits" if need <= figures["device_memory_bytes"] else "DOES NOT FIT"
    rows.append(("device memory", f"{gib(figures['device_memory_bytes'])}  -> {fits}"))
  return "\n".join(f"{name:<30}{value}" for name, value in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  if args.config is None:
    raise app.UsageError("--config is required")
  spec_lib.resolve(args.config)
  if args.topology.startswith("cpu:"):
    jax.config.update("jax_num_cpu_devices", int(args.topology[4:]))
  figures = compile_train_step(args.config, topology_devices(args.topology, args.num_slices))
  print(report(figures))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("topology", "cpu:8", "TPU topology name (e.g. v5p:4x4x8) or cpu:N.")
  flags.DEFINE_integer("num_slices", 1, "TPU slices joined over the data-center network.")
  flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
  app.run(main)
