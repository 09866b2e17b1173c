"""Paper-size configs (parameter counts) and ahead-of-time compilation of the train step."""
import math
import os
import subprocess
import sys

import jax
import pytest

from tfusion import aot, config as config_lib, flops, params, spec as spec_lib
from tfusion.data import sequence
from tests.helpers import REPO

SIZES = {"160m": 0.16e9, "370m": 0.37e9, "760m": 0.76e9, "1_4b": 1.4e9}
LLAMA2_7B_PARAMS = 6_738_415_616      # the paper's 7B is Llama-2-7B's shape


def paper(size, encoder="linear"):
  return config_lib.load_experiment(
      os.path.join(REPO, "experiments", f"transfusion_paper.py:size={size},encoder={encoder}"))


@pytest.mark.parametrize("size", sorted(SIZES))
def test_paper_sizes_match_table_2(size):
  counts = params.count_by_component(paper(size))
  backbone = counts["token_embedding"] + counts["transformer"] + counts["lm_head"]
  assert abs(backbone / SIZES[size] - 1) < 0.03
  assert counts["patch_encoder"] + counts["patch_decoder"] < 0.005 * backbone     # linear: < 0.5% (Table 7)


def test_7b_is_llama2_7b_shaped_and_unet_adds_about_0_27b():
  linear, unet = params.count_by_component(paper("7b")), params.count_by_component(paper("7b", "unet"))
  assert linear["token_embedding"] + linear["transformer"] + linear["lm_head"] == LLAMA2_7B_PARAMS
  assert unet["transformer"] == linear["transformer"]
  assert 0.25e9 < unet["patch_encoder"] + unet["patch_decoder"] < 0.29e9


def test_paper_config_settings():
  c = paper("760m")
  assert (c.seq_len * c.batch_size, c.data.vocab_size, c.optim.lr, c.optim.b2, c.optim.warmup_steps) == (
      2 ** 21, 32_000, 3e-4, 0.95, 4000)
  assert c.optim.lr * c.optim.final_lr_fraction == pytest.approx(1.5e-5)
  assert (c.model.mlp_dim, c.model.patch_size, c.diffusion.loss_weight) == (4096, 2, 5.0)
  assert [config_lib.swiglu_width(d) for d in (768, 1024, 2048, 4096)] == [2048, 2816, 5632, 11008]


def test_params_command_prints_the_table():
  out = subprocess.run([sys.executable, "-m", "tfusion.params", "--config",
                        "experiments/transfusion_paper.py:size=160m,encoder=unet"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  assert "transformer layers" in out.stdout and "unet enc/dec" in out.stdout and "0.16B" in out.stdout


def tiny_config():
  c = config_lib.default_config()
  c.batch_size, c.seq_len = 8, 64
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim, c.model.patch_size = 2, 64, 4, 128, 4
  c.data.image_size, c.data.vocab_size = 16, 256
  c.mesh.ici_data_parallelism, c.mesh.ici_fsdp_parallelism, c.mesh.ici_tensor_parallelism = 1, 4, 2
  return c


def test_aot_compiles_the_sharded_step_and_reports_per_device_memory():
  config = tiny_config()
  figures = aot.compile_train_step(config, aot.topology_devices("cpu:8"))
  assert figures["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and figures["num_devices"] == 8
  total_bytes = 4 * figures["parameters"]
  # Sharded 8 ways except the small timestep MLPs, norms and biases, which stay whole ...
  assert total_bytes / 8 <= figures["params_bytes"] < total_bytes / 4
  # ... and Adam's two moments are laid out the same way.
  assert abs(figures["optimizer_bytes"] - 2 * figures["params_bytes"]) < 64
  assert figures["temp_bytes"] > 0 and figures["peak_bytes"] >= figures["argument_bytes"]
  spec = spec_lib.resolve(config)
  model, layout = spec.transfusion(config.data.vocab_size), spec.layout
  batch = jax.eval_shape(lambda: sequence.dummy_batch(8, layout))
  abstract = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x), *sequence.model_inputs(batch))
  expected = flops.train_flops(model, jax.tree.map(lambda x: x.value, abstract["params"],
                                                   is_leaf=lambda x: hasattr(x, "value")),
                               sequence.model_inputs(batch))
  assert figures["model_tflops_per_device"] == pytest.approx(expected / 8 / 1e12)
  assert "peak / device" in aot.report(figures)


def test_aot_names_a_bad_topology():
  with pytest.raises(ValueError, match="--topology cpu:64: only 8 CPU devices exist"):
    aot.topology_devices("cpu:64")


def test_aot_compiles_for_a_real_tpu_topology_when_libtpu_is_installed():
  pytest.importorskip("libtpu", reason="TPU compiler not installed (pip install -e .[tpu])")
  figures = aot.compile_train_step(tiny_config(), aot.topology_devices("v5p:2x2x2"))
  assert figures["device_kind"].startswith("TPU") and figures["num_devices"] == 8
  assert 0 < figures["peak_bytes"] < figures["device_memory_bytes"]
  assert math.isfinite(figures["model_tflops_per_device"])
