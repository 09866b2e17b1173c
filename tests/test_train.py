"""End to end: the training entry point on a tiny config, resume, outputs and bad input."""
import json
import os
import subprocess
import sys

from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from PIL import Image

from tfusion import config as config_lib
from tfusion.data import sequence
from tfusion.metrics import read_metrics
from tfusion.training import optim, step as step_lib, trainer
from tests.helpers import LAYOUT, REPO, make_model, tiny_model_config, tiny_run_config

LOGGED = {"step", "loss", "text_loss", "image_loss", "lr", "grad_norm", "elements_per_sec", "text_targets", "images",
          "tflops_per_device", "mfu", "packing_efficiency"}


def test_run_leaves_checkpoints_logs_and_samples(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_run_config(data_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert json.load(open(os.path.join(workdir, "config.json")))["seq_len"] == 64
  assert os.path.getsize(os.path.join(workdir, "tokenizer.model")) > 1000
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and set(metrics[0]) == LOGGED
  assert all(0.9 < m["packing_efficiency"] <= 1 for m in metrics)     # text fills what images leave
  assert metrics[0]["lr"] == 0.0 and metrics[2]["lr"] > 0 and all(m["elements_per_sec"] > 0 for m in metrics)
  assert all(0 < m["mfu"] < 1 and m["tflops_per_device"] > 0 for m in metrics)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  samples = os.path.join(workdir, "samples", "step_6")
  grid = Image.open(os.path.join(samples, "images.png"))
  assert grid.size == (4 * 128, 128 + 40)
  lines = open(os.path.join(samples, "captions.txt")).read().split("\n")
  assert lines[0].startswith("truth: ") and lines[1].startswith("model: ")


def test_chameleon_recipe_trains_and_logs_the_z_loss(tmp_path, data_dir):
  """QK-norm, the branch-output norms and the z-loss switched on through the config: the run logs z_loss, and
  loss = text_loss + lambda image_loss + w z_loss."""
  workdir = str(tmp_path / "run")
  config = tiny_run_config(data_dir, total_steps=3, ckpt_every=3, sample_every=100, z_loss_weight=0.01)
  config.model.qk_norm, config.model.norm_placement = True, "branch_output"
  trainer.train_and_evaluate(config, workdir)
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics] == [1, 2, 3] and set(metrics[0]) == LOGGED | {"z_loss"}
  for m in metrics:
    assert m["z_loss"] > 1.0                          # log(Z)^2 at init, Z summed over a 512-token vocabulary
    np.testing.assert_allclose(m["loss"], m["text_loss"] + 5.0 * m["image_loss"] + 0.01 * m["z_loss"], rtol=1e-5)


def test_killed_and_resumed_run_reproduces_uninterrupted_run(tmp_path, data_dir, monkeypatch):
  config = tiny_run_config(data_dir, sample_every=100)
  trainer.train_and_evaluate(config, str(tmp_path / "straight"))

  real = step_lib.jit_train_step

  def crashing_at_step_5(*args, **kwargs):
    step = real(*args, **kwargs)

    def run(state, batch):
      if int(state.step) == 4:
        raise KeyboardInterrupt("simulated kill during step 5")
      return step(state, batch)
    return run

  monkeypatch.setattr(step_lib, "jit_train_step", crashing_at_step_5)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert [m["step"] for m in read_metrics(str(tmp_path / "resumed"))] == [1, 2, 3, 4]
  monkeypatch.setattr(step_lib, "jit_train_step", real)
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"))

  timing = {"elements_per_sec", "tflops_per_device", "mfu"}
  drop = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]  # noqa: E731
  assert drop(read_metrics(str(tmp_path / "resumed"))) == drop(read_metrics(str(tmp_path / "straight")))
  assert len(read_metrics(str(tmp_path / "resumed"))) == 6


def run_cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "tfusion.train", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("override, message", [
    ("--config.no_such_field=1", "no_such_field"),
    ("--config.model.no_such_field=1", "no_such_field"),
    ("--config.seq_len=-5", "config.seq_len = -5: must be a positive integer"),
    ("--config.diffusion.schedule=quadratic", "config.diffusion.schedule = 'quadratic': must be one of"),
    ("--config.data.caption_first_prob=1.5", "config.data.caption_first_prob = 1.5: must be in [0, 1]"),
])
def test_bad_overrides_stop_before_compute_naming_the_field(tmp_path, override, message):
  result = run_cli("--config", "experiments/shapes_tiny.py", "--workdir", str(tmp_path / "w"), override)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_missing_text_corpus_names_the_file(tmp_path, data_dir):
  config = tiny_run_config(data_dir)
  config.data.text_source = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))


def test_batch_size_must_divide_over_data_shards(tmp_path, data_dir):
  with pytest.raises(config_lib.ConfigError, match="config.batch_size = 6"):
    trainer.train_and_evaluate(tiny_run_config(data_dir, batch_size=6), str(tmp_path / "w"))


def test_nan_loss_stops_without_saving(tmp_path, data_dir):
  config = tiny_run_config(data_dir, ckpt_every=1)
  config.optim.lr, config.optim.warmup_steps, config.optim.grad_clip = 1e30, 1, 1e30
  with pytest.raises(FloatingPointError, match=r"at step \d+ .* last checkpoint: step \d+"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
  saved = [int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]
  last_logged = read_metrics(str(tmp_path / "w"))[-1]
  assert np.isfinite(last_logged["loss"]) and max(saved) == last_logged["step"]


def unet_qk_norm_params(abstract: bool):
  """The params of a tiny model with QK-norm and the U-Net patch encoder/decoder (widths 8, 16; 1 ResBlock per
  level), as ShapeDtypeStructs when abstract."""
  model = make_model(tiny_model_config(patch_encoder="unet", qk_norm=True, unet_channels=(8, 16), unet_res_blocks=1))
  init = lambda: model.init(jax.random.key(0), *sequence.model_inputs(sequence.dummy_batch(1, LAYOUT)))  # noqa: E731
  return nn.unbox((jax.eval_shape(init) if abstract else jax.jit(init)())["params"])


def test_weight_decay_reaches_kernels_and_embeddings_only():
  """By name: every dense / conv kernel (1x1 convs too) and the token table; no norm scale (the scanned layers'
  [layers, D] ones included) and no bias."""
  params = unet_qk_norm_params(abstract=True)
  mask = optim.decay_mask(params)
  leaves = {"/".join(k.key for k in path): (leaf.shape, decayed) for (path, leaf), decayed in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(mask))}
  decayed = {name for name, (_, d) in leaves.items() if d}
  qkvo = ("query", "key", "value", "out")
  assert decayed == {
      "token_embedding/embedding", "lm_head/kernel",
      *(f"transformer/layers/attention/{m}/kernel" for m in qkvo),
      *(f"transformer/layers/mlp/{m}/kernel" for m in ("gate", "up", "down")),
      *(f"patch_encoder/{m}/kernel" for m in ("conv_in", "down_0_downsample", "proj_out", "timestep_embedding/hidden",
                                              "timestep_embedding/out", "down_1_res_0/residual")),
      *(f"patch_encoder/down_{i}_res_0/{m}/kernel" for i in (0, 1) for m in ("conv1", "conv2", "temb_proj")),
      *(f"patch_encoder/down_1_attn_0/{m}/kernel" for m in qkvo),
      *(f"patch_decoder/{m}/kernel" for m in ("proj_in", "conv_out", "up_1_upsample", "timestep_embedding/hidden",
                                              "timestep_embedding/out")),
      *(f"patch_decoder/up_{i}_res_{j}/{m}/kernel" for i in (0, 1) for j in (0, 1)
        for m in ("conv1", "conv2", "temb_proj", "residual")),
      *(f"patch_decoder/up_1_attn_{j}/{m}/kernel" for j in (0, 1) for m in qkvo)}
  kept = set(leaves) - decayed
  assert all(name.endswith(("/scale", "/bias")) for name in kept) and len(kept) == 84
  stacked = {"transformer/layers/attention_norm/scale": (2, 32), "transformer/layers/mlp_norm/scale": (2, 32),
             "transformer/layers/attention/query_norm/scale": (2, 8),
             "transformer/layers/attention/key_norm/scale": (2, 8)}
  assert {name: leaves[name][0] for name in stacked} == stacked and set(stacked) <= kept
  assert {"transformer/final_norm/scale", "patch_encoder/out_norm/scale", "patch_decoder/up_1_res_0/norm1/scale",
          "patch_decoder/conv_out/bias"} <= kept


def test_one_step_of_decay_alone_shrinks_kernels_and_leaves_norm_scales():
  """Zero gradients: Adam's update is 0, so a step is p <- p (1 - lr wd) on decayed leaves and nothing elsewhere."""
  config = config_lib.default_config().optim
  config.lr, config.warmup_steps, config.weight_decay = 0.01, 0, 0.1
  tx, schedule = optim.make_optimizer(config, total_steps=10)
  assert float(schedule(0)) == pytest.approx(0.01)              # no warmup: the peak lr at step 0
  params = unet_qk_norm_params(abstract=False)
  updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  before, after = (traverse_util.flatten_dict(t, sep="/") for t in (params, optax.apply_updates(params, updates)))
  for name in ("transformer/layers/attention_norm/scale", "transformer/layers/mlp_norm/scale",
               "transformer/layers/attention/query_norm/scale", "transformer/final_norm/scale",
               "patch_encoder/down_0_res_0/norm1/scale", "patch_encoder/conv_in/bias"):
    np.testing.assert_array_equal(after[name], before[name])
  for name in ("transformer/layers/mlp/up/kernel", "patch_encoder/conv_in/kernel", "token_embedding/embedding"):
    assert np.abs(before[name]).max() > 0.01
    np.testing.assert_allclose(after[name], before[name] * (1 - 0.01 * 0.1), rtol=1e-6)
