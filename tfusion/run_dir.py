"""A run directory: the one place that knows its layout, and reads and writes what it holds.

  <run>/config.json              the run's config (ConfigDict JSON; config.from_json reads old ones too)
  <run>/config_changes.jsonl     changes accepted on resume (config_resume.py)
  <run>/tokenizer.model          the sentencepiece tokenizer of a Transfusion run
  <run>/codec.json               vae codec: the VAE and the latents' shift / scale (codecs.py)
  <run>/checkpoints/<step>/      orbax: state, data position, checksums (checkpoints.py)
  <run>/metrics.jsonl, metrics_dropped.jsonl, tensorboard/   (metrics.py)
  <run>/samples/step_<N>/        sample grids;  <run>/eval/step_<N>.json: evaluation reports
  <run>/jax_cache/               compilations, unless the environment names a cache
  <run>/tfusion.lock             the lock of the command running in it (workdir_lock.py)

An export (`python -m tfusion.export`, ExportDir) has the same config.json, tokenizer.model and codec.json,
and export.json, params/, model.safetensors and vae/. Latent caches and prepared datasets name their
tokenizer and codec files as a run does (TOKENIZER_FILE, CODEC_FILE).
"""
import json
import os

from absl import logging
import jax

from tfusion import checkpoints as checkpoints_lib, config as config_lib, distributed, sharding
from tfusion.data import tokenizer as tokenizer_lib

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
CODEC_FILE = "codec.json"


def write_json(path: str, value) -> None:
  """Writes `value` as indented JSON through a .tmp file renamed into place: a reader never sees half of it."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


class RunDir:
  """The directory of a training run (tfusion.train or tfusion.train_vae); see the module docstring."""

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(path))

  def __repr__(self) -> str:
    return f"RunDir({self.path!r})"

  def _file(self, name: str) -> str:
    return os.path.join(self.path, name)

  # --- The layout. -------------------------------------------------------------------------------
  @property
  def config_file(self) -> str:
    return self._file(CONFIG_FILE)

  @property
  def config_changes_file(self) -> str:
    return self._file("config_changes.jsonl")

  @property
  def tokenizer_file(self) -> str:
    return self._file(TOKENIZER_FILE)

  @property
  def codec_file(self) -> str:
    return self._file(CODEC_FILE)

  @property
  def checkpoints(self) -> str:
    return self._file("checkpoints")

  @property
  def metrics_file(self) -> str:
    return self._file("metrics.jsonl")

  @property
  def dropped_metrics_file(self) -> str:
    return self._file("metrics_dropped.jsonl")

  @property
  def tensorboard(self) -> str:
    return self._file("tensorboard")

  @property
  def compilation_cache(self) -> str:
    return self._file("jax_cache")

  def samples(self, step: int) -> str:
    return os.path.join(self.path, "samples", f"step_{step}")

  def eval_report(self, step: int) -> str:
    return os.path.join(self.path, "eval", f"step_{step}.json")

  # --- What it holds. ----------------------------------------------------------------------------
  def is_run(self) -> bool:
    """True when the directory holds a recorded config and a checkpoints directory."""
    return os.path.isfile(self.config_file) and os.path.isdir(self.checkpoints)

  def read_config(self, defaults=None):
    """The recorded config, over `defaults` (config.from_json: default_config() with the values of the time
    for fields added since); FileNotFoundError when there is none."""
    if not os.path.isfile(self.config_file):
      raise FileNotFoundError(f"{self.config_file} not found: {self.path} is not a tfusion training run directory")
    with open(self.config_file) as f:
      return config_lib.from_json(f.read(), self.config_file, defaults)

  def write_config(self, config) -> None:
    with open(self.config_file + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(self.config_file + ".tmp", self.config_file)

  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.Tokenizer.load(self.tokenizer_file)

  def saved_steps(self) -> list[int]:
    """Steps of the committed checkpoints, ascending."""
    return checkpoints_lib.saved_steps(self.checkpoints)

  def checkpointer(self, max_to_keep: int = 1, writer: bool = False) -> checkpoints_lib.Checkpointer:
    return checkpoints_lib.Checkpointer(self.checkpoints, max_to_keep, writer=writer)

  def restore_params(self, step: int | None, abstract_params, item: str = "params") -> tuple[object, int]:
    """(params, step) of checkpoint `step` (None: the latest) restored into `abstract_params` (ShapeDtypeStructs
    with shardings, or numpy arrays); item "params" or "ema_params". FileNotFoundError when there is no
    checkpoint, ValueError for a step that was not saved."""
    if not os.path.isdir(self.checkpoints):
      raise FileNotFoundError(f"no checkpoint in {self.checkpoints}: train the run first")
    ckpt = self.checkpointer()
    try:
      steps = ckpt.all_steps()
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.checkpoints}: train the run first")
      step = max(steps) if step is None else step
      if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {self.checkpoints}; saved steps: {sorted(steps)}")
      return ckpt.restore_params(step, abstract_params, item), step
    finally:
      ckpt.close()

  def open_checkpoints(self, max_to_keep: int, state, shardings, data_iterator,
                       init_from: str = "") -> tuple[checkpoints_lib.Checkpointer, object, int]:
    """(writing checkpointer, state, step) of a run that starts or resumes: the newest checkpoint that verifies
    (process 0 decides, checkpoints_lib.set_aside_corrupt; every process restores that step) together with the data
    position; else, at step 0, `state` (a TrainState-like tree with params and ema_params) with the params of
    `init_from` (see init_source) if given, or as it is."""
    step = distributed.chief_decides("checking the checkpoints",
                                     lambda: checkpoints_lib.set_aside_corrupt(self.checkpoints)) or 0
    ckpt = self.checkpointer(max_to_keep, writer=True)
    if step:
      logging.info("resuming from step %d", step)
      state = ckpt.restore(step, sharding.abstract_like(state, shardings), data_iterator, verified=True)
    elif init_from:
      source, source_step = init_source(init_from)
      logging.info("initialising the params from %s, step %d", source.path, source_step)
      params, _ = source.restore_params(source_step, sharding.abstract_like(state.params, shardings.params))
      state = state.replace(params=params,
                            ema_params=None if state.ema_params is None else jax.tree.map(jax.numpy.copy, params))
    return ckpt, state, step

  def keep_compilations(self) -> None:
    """Keep compilations in the run directory unless the environment names a cache (JAX_COMPILATION_CACHE_DIR,
    e.g. one shared by many runs)."""
    if not jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", self.compilation_cache)


def init_source(path: str) -> tuple[RunDir, int]:
  """(run, step) of config.init_from: a training run directory (its latest checkpoint) or one checkpoint
  directory <run>/checkpoints/<step>."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(RunDir(path).checkpoints):
    run = RunDir(path)
    steps = run.saved_steps()
    step = steps[-1] if steps else None
  elif os.path.basename(path).isdigit() and os.path.isdir(path):
    run, step = RunDir(os.path.dirname(os.path.dirname(path))), int(os.path.basename(path))
  else:
    raise FileNotFoundError(f"config.init_from = {path!r}: neither a training workdir nor <workdir>/checkpoints/<step>")
  if step is None:
    raise FileNotFoundError(f"config.init_from = {path!r}: the run has no checkpoint yet")
  return run, step


class ExportDir(RunDir):
  """An export directory: a run's config, tokenizer and codec, and its params alone (export.py)."""

  @property
  def info_file(self) -> str:
    return self._file("export.json")

  @property
  def params(self) -> str:
    return self._file("params")

  @property
  def safetensors(self) -> str:
    return self._file("model.safetensors")

  @property
  def vae(self) -> str:
    return self._file("vae")

  def read_info(self) -> dict:
    if not os.path.isfile(self.info_file):
      raise FileNotFoundError(f"{self.path} is not a tfusion export (no export.json): write one with python -m "
                              "tfusion.export")
    with open(self.info_file) as f:
      return json.load(f)
