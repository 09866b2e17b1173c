"""benchmarks/tpu_estimate.py and plain_llama.py: what their estimates rest on, checked on CPU."""
import os
import sys

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import pytest

from tfusion import spec as spec_lib
from tfusion.data import sequence
from tests.helpers import make_model
from tests.test_model import tiny_batch, tiny_model_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import plain_llama  # noqa: E402
import tpu_estimate  # noqa: E402


def barriers_in_gradient(remat: str, model: str) -> int:
  """optimization_barrier ops in the gradient of a 4-layer, unrolled model's summed output, lowered for TPU."""
  config = tiny_model_config(remat_policy=remat, num_layers=4, d_model=64, mlp_dim=256)
  if model == "llama":
    net = plain_llama.PlainLlama(spec_lib.resolve(config).model.transformer, 100)
    inputs = (jnp.zeros((2, config.seq_len), jnp.int32),)
  else:
    net = make_model(config)
    tcfg = dataclasses.replace(net.cfg.transformer, unroll_layers=True)
    net = net.clone(cfg=dataclasses.replace(net.cfg, transformer=tcfg))
    inputs = sequence.model_inputs(tiny_batch())
  params = jax.eval_shape(net.init, jax.random.key(0), *inputs)["params"]
  loss = lambda p: sum(jnp.sum(y) for y in jax.tree.leaves(net.apply({"params": p}, *inputs)))  # noqa: E731
  # Lowered for TPU, the program the estimates price (on CPU the linear layers' gradients add barriers of their own).
  return jax.export.export(jax.jit(jax.grad(loss)), platforms=["tpu"])(params).mlir_module().count("optimization_barrier")


@pytest.mark.parametrize("model", ["tfusion", "llama"])
def test_unrolled_layers_keep_their_remat(model):
  """The estimates unroll the layers; each layer's recomputation must then sit behind remat's optimization
  barrier (prevent_cse), or XLA merges it into the forward pass (the TPU compiler did: the Llama's estimate
  had no recompute while its memory was that of remat)."""
  assert barriers_in_gradient("none", model) == 0
  assert barriers_in_gradient("full", model) >= 1


def test_each_row_is_compared_with_the_llama_of_its_attention_and_remat():
  def row(model, attention, remat, mfu, plan="7b@v5:4x4x4"):
    return dict(plan=plan, model=model, attention=attention, remat=remat, estimated_mfu=mfu,
                label=f"{model} 7b, {attention} attention, remat {remat}")
  rows = [row("plain Llama", "dense", "full", 0.4), row("plain Llama", "flash", "full", 0.6),
          row("plain Llama", "flash", "dots_saveable", 0.7), row("plain Llama", "flash", "full", 0.1, plan="other")]
  flash = row("tfusion", "flash", "full", 0.57)
  assert tpu_estimate.ratio_to_llama(flash, rows, "same") == pytest.approx(0.95)
  assert tpu_estimate.ratio_to_llama(flash, rows, "dense") == pytest.approx(1.425)
  chunked = row("tfusion", "chunked", "full", 0.3)
  assert math.isnan(tpu_estimate.ratio_to_llama(chunked, rows, "same"))       # no chunked Llama in the rows
  assert tpu_estimate.extrapolate(0.25, 0.4, 32) == pytest.approx(0.25 + 31 * 0.15)


def test_model_flops_count_6nd_plus_causal_attention():
  config = tiny_model_config(num_layers=4, d_model=64, mlp_dim=256)
  config.batch_size, config.data.vocab_size = 8, 1000
  layer = 4 * 64 * 64 + 3 * 64 * 256
  tokens = 8 * config.seq_len / 4
  want = 6 * (4 * layer + 64 * 1000) * tokens + 6 * 4 * 64 * config.seq_len * tokens
  assert tpu_estimate.model_flops_per_device(config, 4) == pytest.approx(want)


def test_a_negative_cost_model_time_gives_no_estimate():
  """On v6e the cost model prices a Pallas call at -1 s: such a row must carry no seconds or MFU."""
  config = tiny_model_config(num_layers=4, d_model=64, mlp_dim=256)
  devices = [types.SimpleNamespace(device_kind="TPU v5")] * 4
  def fake_step(seconds):
    return lambda config, devices, layers: {"compiler_flops": 1e12 * layers, "seconds": seconds(layers),
                                            "peak_bytes": 1.0}
  good = tpu_estimate.estimate("good", fake_step(lambda n: 0.1 + 0.2 * n), config, devices, memory=False)
  assert good["seconds"] == pytest.approx(0.3 + 3 * 0.2) and good["compiler_flops"] == pytest.approx(4e12)
  assert good["estimated_mfu"] == pytest.approx(good["model_flops"] / (good["seconds"] * 459e12))
  bad = tpu_estimate.estimate("bad", fake_step(lambda n: -1.0 + 0.01 * n), config, devices, memory=False)
  assert math.isnan(bad["seconds"]) and math.isnan(bad["estimated_mfu"])


def test_attention_alone_compiles_one_layers_attention_for_one_device():
  """--attention_alone on the CPU 'topology': dense attention forward and backward is 6 matmuls of B H L^2 Dh (2
  forward, 4 backward), and the figures are those of one device."""
  row = tpu_estimate.attention_alone("dense", "160m", "cpu:1", rows=1, seq_len=256)
  heads, head_dim = 12, 64                                               # the 0.16B config: 768 wide
  matmuls = 6 * 2 * heads * 256 * 256 * head_dim / 1e12
  assert (row["plan"], row["attention"], row["rows"], row["seq_len"]) == ("160m@cpu:1", "dense", 1, 256)
  assert matmuls <= row["compiler_flops"] / 1e12 < 1.1 * matmuls          # no remat: the forward runs once
  assert row["peak_bytes"] > 0
