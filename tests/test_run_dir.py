"""The run directory: its layout, the config of an old run, init_from paths, and the errors that name them."""
import json
import os

import pytest

from tfusion import config as config_lib, run_dir


def test_the_layout_is_the_documented_one(tmp_path):
  run = run_dir.RunDir(str(tmp_path))
  files = {"config_file": "config.json", "config_changes_file": "config_changes.jsonl",
           "tokenizer_file": "tokenizer.model", "codec_file": "codec.json", "checkpoints": "checkpoints",
           "metrics_file": "metrics.jsonl", "dropped_metrics_file": "metrics_dropped.jsonl",
           "tensorboard": "tensorboard", "compilation_cache": "jax_cache"}
  assert {name: os.path.relpath(getattr(run, name), tmp_path) for name in files} == files
  assert os.path.relpath(run.samples(7), tmp_path) == os.path.join("samples", "step_7")
  assert os.path.relpath(run.eval_report(7), tmp_path) == os.path.join("eval", "step_7.json")
  export = run_dir.ExportDir(str(tmp_path))
  assert [os.path.basename(p) for p in (export.info_file, export.params, export.safetensors, export.vae)] == [
      "export.json", "params", "model.safetensors", "vae"]


def test_a_config_recorded_before_newer_fields_loads_with_the_values_of_its_time(tmp_path):
  run = run_dir.RunDir(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json not found: .* is not a tfusion training run directory"):
    run.read_config()
  recorded = json.loads(config_lib.default_config().to_json())
  del recorded["ema_decay"], recorded["diffusion"]["prediction"]
  with open(run.config_file, "w") as f:
    json.dump(recorded, f)
  config = run.read_config()
  assert (config.ema_decay, config.diffusion.prediction) == (0.0, "eps")
  run.write_config(config)
  assert run.read_config().to_dict() == config.to_dict() and not os.path.exists(run.config_file + ".tmp")


def test_init_from_names_a_run_or_one_of_its_checkpoints(tmp_path):
  run = run_dir.RunDir(str(tmp_path / "run"))
  with pytest.raises(FileNotFoundError, match="neither a training workdir nor"):
    run_dir.init_source(run.path)
  os.makedirs(os.path.join(run.checkpoints, "4"))
  os.makedirs(os.path.join(run.checkpoints, "8"))
  source, step = run_dir.init_source(run.path)
  assert (source.path, step) == (run.path, 8)
  source, step = run_dir.init_source(os.path.join(run.checkpoints, "4"))
  assert (source.path, step) == (run.path, 4)
  assert source.tokenizer_file == run.tokenizer_file
  empty = run_dir.RunDir(str(tmp_path / "empty"))
  os.makedirs(empty.checkpoints)
  with pytest.raises(FileNotFoundError, match="the run has no checkpoint yet"):
    run_dir.init_source(empty.path)


def test_restoring_params_names_what_is_missing(tmp_path):
  run = run_dir.RunDir(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints: train the run first"):
    run.restore_params(None, {})
