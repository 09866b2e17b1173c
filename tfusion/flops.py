"""Model FLOPs per train step and the peak they are measured against (MFU).

Model FLOPs are what the forward pass computes, counted by XLA on the lowered (not compiled)
program, times 3 for forward + backward. XLA counts a scanned body once, so the layer stack is
counted as the whole model (with one layer) plus (num_layers - 1) separately lowered layers.
Attention is counted as computed: all L x L scores, masked entries included. A U-Net patch encoder and
decoder are counted on every image slot (unet_skip_empty_slots off), an upper bound: they run on the
images present only.
"""
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from tfusion.models import transformer

# Dense bf16 peak TFLOP/s per device (per chip on TPU) from the vendors' data sheets.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5": 459.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
}


def _lowered_flops(fn, *args) -> float:
  """XLA's FLOP count of fn on unsharded shapes (lowered for the host, whatever devices args live on)."""
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def forward_flops(model, params, inputs) -> float:
  """FLOPs of one forward pass of the Transfusion `model` on `inputs` (abstract values are fine)."""
  tcfg = dataclasses.replace(model.cfg.transformer, attention="dense", remat_policy="none")
  model = model.clone(cfg=dataclasses.replace(model.cfg, transformer=tcfg, unet_skip_empty_slots=False))
  whole = _lowered_flops(lambda p, *x: model.apply({"params": p}, *x), params, *inputs)
  tokens = inputs[0]
  batch, length = tokens.shape
  block = transformer.Block(tcfg)
  x = jax.ShapeDtypeStruct((batch, length, tcfg.d_model), tcfg.dtype)
  layer_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                              params["transformer"]["layers"])
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  layer = _lowered_flops(lambda p, *a: block.apply({"params": p}, *a), layer_params, x, ids, ids, ids)
  return whole + (tcfg.num_layers - 1) * layer


def train_flops(model, params, inputs) -> float:
  """Model FLOPs of one train step: forward + backward = 3 x forward."""
  return 3.0 * forward_flops(model, params, inputs)


@functools.cache
def measured_matmul_tflops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` TFLOP/s of a jitted size x size matmul on the default device.

  bfloat16 multiplies accumulate in float32, as the model's einsums do on CPU/GPU.
  """
  a = jnp.ones((size, size), dtype)
  return 2 * size**3 / best_seconds(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32), a, a,
                                    repeats=repeats) / 1e12


def best_seconds(f, *args, repeats: int = 5) -> float:
  """The fastest of `repeats` runs of jax.jit(f)(*args), after one that compiles it."""
  f = jax.jit(f)
  f(*args).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(*args).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def peak_tflops_per_device(configured: float, compute_dtype: str) -> tuple[float, str]:
  """(peak, where it came from): the configured value, the known device peak, or (CPU) measured."""
  if configured > 0:
    return configured, "config.peak_tflops_per_device"
  kind = jax.devices()[0].device_kind
  if kind in PEAK_TFLOPS:
    return PEAK_TFLOPS[kind], f"data sheet ({kind}, bf16)"
  return measured_matmul_tflops(compute_dtype), f"measured {compute_dtype} matmul on {kind}"
