import glob
import importlib.util
import json
import os

import pytest

from tfusion import config as config_lib, config_resume, spec as spec_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


PREPARE = os.path.join(REPO, "experiments", "prepare.py")


@pytest.mark.parametrize("path", sorted(set(glob.glob(os.path.join(REPO, "experiments", "*.py"))) - {PREPARE}))
def test_every_experiment_file_loads_and_validates(path):
  config = load_experiment(path).get_config()
  if "variants" in config:                 # an ablation: every variant of its base config
    from tfusion import ablate   # pylint: disable=import-outside-toplevel
    for variant in config.variants:
      ablate.cell_config(config, variant, config.seeds[-1])
    return
  (config_lib.validate_vae if "loss" in config else spec_lib.resolve)(config)


def test_every_prepare_preset_validates():
  module = load_experiment(PREPARE)
  for preset in module.PRESETS:
    config = module.get_config(preset)
    config.path = config.path or "/data/somewhere"
    config_lib.validate_prepare(config)
  with pytest.raises(ValueError, match="unknown preset 'laion'"):
    module.get_config("laion")


def load_experiment(path):
  spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_experiment_argument_sets_the_image_size():
  config = load_experiment(os.path.join(REPO, "experiments", "shapes_tiny.py")).get_config("64")
  assert config.data.image_size == 64
  spec_lib.resolve(config)
  spec_lib.resolve(config)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "config.batch_size = 0: must be a positive integer"),
    ("optim.warmup_steps", -1, "config.optim.warmup_steps = -1: must be a positive integer"),
    ("model.d_model", 102, "config.model.d_model = 102: must be divisible by model.num_heads"),
    ("model.patch_size", 5, "config.model.patch_size = 5: must divide the latent size 32"),
    ("seq_len", 100, "config.seq_len = 100: must hold one image (256 patches"),
    ("diffusion.image_first_max_t", 2000, "config.diffusion.image_first_max_t = 2000"),
    ("data.codec", "vqgan", "config.data.codec = 'vqgan': must be one of"),
    ("model.image_attention", "sideways", "config.model.image_attention = 'sideways': must be one of"),
    ("mesh.ici_fsdp_parallelism", 0, "config.mesh.ici_fsdp_parallelism = 0"),
    ("diffusion.prediction", "x0", "config.diffusion.prediction = 'x0': must be one of ('eps', 'v')"),
    ("diffusion.min_snr_gamma", -1.0, "config.diffusion.min_snr_gamma = -1.0: must be >= 0"),
    ("ema_decay", 1.0, "config.ema_decay = 1.0: must be in [0, 1)"),
    ("model.decoder_head", "mlp", "config.model.decoder_head = 'mlp': must be one of ('linear', 'adaln_zero')"),
    ("optim.lr", 1e39, "config.optim.lr = 1e+39: must be finite in float32"),
    ("optim.lr", float("nan"), "config.optim.lr = nan: must be finite in float32"),
    ("optim.lr", 0.0, "config.optim.lr = 0.0: must be > 0"),
    ("optim.lr", -1e-4, "config.optim.lr = -0.0001: must be > 0"),
    ("optim.b2", 1.0, "config.optim.b2 = 1.0: must be < 1"),
    ("optim.eps", 0.0, "config.optim.eps = 0.0: must be > 0"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay = -0.1: must be >= 0"),
    ("optim.grad_clip", float("inf"), "config.optim.grad_clip = inf: must be finite"),
    ("nonfinite_skip_limit", -1, "config.nonfinite_skip_limit = -1: must be >= 0"),
    ("data.max_images_per_row", -2, "config.data.max_images_per_row = -2: must be an int >= 0"),
    ("model.norm_placement", "post", "config.model.norm_placement = 'post': must be one of ('pre', 'branch_output')"),
    ("z_loss_weight", -1e-4, "config.z_loss_weight = -0.0001: must be finite and >= 0 (0 = off)"),
    ("z_loss_weight", float("nan"), "config.z_loss_weight = nan: must be finite and >= 0"),
    ("z_loss_weight", float("inf"), "config.z_loss_weight = inf: must be finite and >= 0"),
])
def test_invalid_values_name_the_field(field, value, message):
  config = config_lib.default_config()
  group, _, name = field.rpartition(".")
  (config[group] if group else config)[name] = value
  with pytest.raises(config_lib.ConfigError) as error:
    spec_lib.resolve(config)
  assert message in str(error.value)


def test_paper_recipes_differ_by_the_chameleon_stability_changes_only():
  """transfusion_paper.py:recipe=chameleon switches on QK-norm, the branch-output norms, z-loss 1e-4 and lr 1e-4;
  every other field stays the Transfusion recipe's; an unknown recipe is refused."""
  module = load_experiment(os.path.join(REPO, "experiments", "transfusion_paper.py"))
  flat = config_resume.flatten
  base, chameleon = flat(module.get_config("size=160m")), flat(module.get_config("size=160m,recipe=chameleon"))
  assert {k: (base[k], chameleon[k]) for k in base if base[k] != chameleon[k]} == {
      "model.qk_norm": (False, True), "model.norm_placement": ("pre", "branch_output"),
      "z_loss_weight": (0.0, 1e-4), "optim.lr": (3e-4, 1e-4)}
  assert base == flat(module.get_config("size=160m,recipe=transfusion"))
  spec = spec_lib.resolve(module.get_config("size=160m,recipe=chameleon"))
  assert (spec.model.transformer.qk_norm, spec.model.transformer.norm_placement) == (True, "branch_output")
  with pytest.raises(ValueError, match="unknown recipe 'llama': one of"):
    module.get_config("recipe=llama")


def test_unknown_field_is_rejected():
  config = config_lib.default_config()
  config.model.unlock()
  config.model.depth = 3
  with pytest.raises(config_lib.ConfigError, match=r"config.model has unknown or missing fields: \['depth'\]"):
    spec_lib.resolve(config)


def test_unet_refuses_the_linear_decoder_options():
  config = config_lib.default_config()
  config.model.patch_encoder, config.model.unet_channels, config.model.decoder_skip = "unet", (8, 16), True
  with pytest.raises(config_lib.ConfigError, match="config.model.decoder_skip = True: applies to the linear patch"):
    spec_lib.resolve(config)


def test_a_recorded_config_without_newer_fields_keeps_the_behaviour_it_was_trained_with():
  """A config.json written before diffusion.prediction, ema_decay, ... existed loads with the values of that
  time (eps, no EMA, ...), not with today's defaults; recorded values win over both."""
  recorded = config_lib.default_config()
  assert (recorded.diffusion.prediction, recorded.ema_decay) == ("v", 0.9999)
  old = json.loads(recorded.to_json())
  for dotted in config_lib.VALUES_BEFORE_FIELD_EXISTED:
    *group, name = dotted.split(".")
    del (old[group[0]] if group else old)[name]
  loaded = config_lib.from_json(json.dumps(old))
  assert (loaded.diffusion.prediction, loaded.ema_decay, loaded.model.decoder_input) == ("eps", 0.0, "final_norm")
  assert (loaded.z_loss_weight, loaded.model.qk_norm, loaded.model.norm_placement) == (0.0, False, "pre")
  assert config_lib.from_json(recorded.to_json()).diffusion.prediction == "v"


def test_vae_optimizer_values_are_checked_too():
  config = config_lib.default_vae_config()
  config.optim.lr = float("inf")
  with pytest.raises(config_lib.ConfigError, match="config.optim.lr = inf: must be finite in float32"):
    config_lib.validate_vae(config)
