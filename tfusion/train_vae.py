r"""Train the image VAE: python -m tfusion.train_vae --config experiments/vae_shapes.py --workdir DIR.

The KL-VAE of tfusion.models.vae, or with config.model.bottleneck = "vq" the VQ-VAE of the Chameleon baseline
(experiments/vqvae_shapes.py), with the paper's loss (tfusion.training.vae_step), sharded like the
Transfusion trainer (params by logical axis names, image rows over data x fsdp), orbax checkpoints
with the input position, metrics.jsonl + TensorBoard, and reconstruction grids of test images with the
test PSNR. Running the same command again resumes (with the same config, as tfusion.train: the workdir
lock, SIGTERM / SIGINT saves, checkpoint checksums and the non-finite check before saves apply here too;
docs/reliability.md). A finished KL workdir is a VAE that
`config.data.vae` of a Transfusion run (and tfusion.encode_latents) can point at.
"""
import os
import time

from absl import app, flags, logging
import grain
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags
import numpy as np
import tqdm

from tfusion import (codecs, config as config_lib, config_resume, distributed, metrics as metrics_lib, run_dir,
                     sharding, visualize, workdir_lock)
from tfusion.data import pipeline, shapes
from tfusion.evaluation import metrics as eval_metrics
from tfusion.models import discriminator as disc_lib, lpips as lpips_lib, moco as moco_lib, vae as vae_lib
from tfusion.training import nonfinite, preemption, state as state_lib, vae_step

GRID_IMAGES = 8        # test images shown with their reconstructions
EVAL_IMAGES = 1000     # test images the PSNR is measured on


def image_batches(source, rows: int, seed: int, process_index: int, process_count: int):
  """This process's share of the images, reshuffled every epoch: uint8 [rows, S, S, 3] batches."""
  ds = (grain.MapDataset.source(source)[process_index::process_count].shuffle(seed=seed).repeat()
        .map(lambda example: example["image"]).batch(rows, drop_remainder=True))
  return grain.experimental.ThreadPrefetchIterDataset(ds.to_iter_dataset(), prefetch_buffer_size=2)


def load_frozen_networks(loss_config, mesh) -> dict:
  """{name: replicated params} of the perceptual terms in use (vae_step.PERCEPTUAL): those with a
  weight > 0 and a weights file; a term with a weight but no file is off, with a warning."""
  loaders = {"lpips": lpips_lib.load_lpips_params, "moco": moco_lib.load_moco_params}
  frozen = {}
  for name, load in loaders.items():
    weight, path = loss_config[f"{name}_weight"], loss_config[f"{name}_params"]
    if weight == 0:
      continue
    if not path:
      logging.warning("config.loss.%s_params is empty: the %s term is OFF (no pretrained weights; "
                      "tfusion/models/%s.py says how to make the file)", name, name, name)
      continue
    logging.info("%s weights from %s", name, path)
    frozen[name] = jax.device_put(load(path), sharding.replicated(mesh))
  return frozen


def reconstruct(model: vae_lib.AutoencoderKL | vae_lib.VQModel, params, images: np.ndarray) -> np.ndarray:
  """uint8 [N, S, S, 3] -> uint8 reconstructions through the posterior mean, or the nearest codes (on this
  process)."""
  if isinstance(model, vae_lib.VQModel):
    return codecs.vq_reconstruct(model, params, images)
  vae = model.config
  codec = codecs.VaeCodec(vae, params, np.zeros(vae.latent_channels, np.float32),
                          np.ones(vae.latent_channels, np.float32), {})
  return codec.decode(codec.encode(images))


def evaluate(step: int, params, model, test_images: np.ndarray, workdir: str) -> float:
  """Test PSNR; process 0 also writes samples/step_<step>/reconstructions.png (input, reconstruction)."""
  params = multihost_utils.process_allgather(params, tiled=True)
  reconstructions = reconstruct(model, params, test_images)
  if distributed.is_chief():
    out = run_dir.RunDir(workdir).samples(step)
    os.makedirs(out, exist_ok=True)
    pairs = np.stack([test_images[:GRID_IMAGES], reconstructions[:GRID_IMAGES]], 1).reshape(
        -1, *test_images.shape[1:])
    visualize.save_image_grid(os.path.join(out, "reconstructions.png"), pairs,
                              ["input", "reconstruction"] * GRID_IMAGES)
  return float(eval_metrics.psnr(test_images, reconstructions))


def train_vae(config, workdir: str, allow_config_change: tuple[str, ...] = ()) -> int:
  """Train (or resume) the VAE run in `workdir` to config.total_steps, holding the workdir's lock; returns
  the exit status (130 after a clean stop on SIGINT). allow_config_change: as tfusion.train's."""
  config_lib.validate_vae(config)
  with workdir_lock.hold(workdir):
    return _train_vae(config, workdir, tuple(allow_config_change))


def _train_vae(config, workdir: str, allow_config_change: tuple[str, ...]) -> int:
  accepted = config_resume.check(config, workdir, defaults=config_lib.default_vae_config(), allow=allow_config_change)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(mesh, config.batch_size)

  data_dir = os.path.expanduser(config.data.data_dir)
  train_images, test_source = distributed.chief_first("build shapes", lambda: (
      shapes.load_shapes(data_dir, "train", config.data.image_size),
      shapes.load_shapes(data_dir, "test", config.data.image_size)))
  test_images = np.stack([e["image"] for e in pipeline.take(test_source, EVAL_IMAGES)])
  data_iterator = iter(image_batches(train_images, config.batch_size // jax.process_count(), config.seed,
                                     jax.process_index(), jax.process_count()))

  model = codecs.autoencoder_of_run(config)
  disc = disc_lib.PatchDiscriminator(config.discriminator.channels, config.discriminator.num_layers)
  tx = vae_step.make_optimizer(config.optim)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  state, state_shardings = sharding.create_sharded(vae_step.init_fn(model, disc, tx, config.data.image_size),
                                                    init_key, mesh)
  logging.info("VAE parameters: %d (f = %d, %d latent channels); discriminator: %d",
               state_lib.count_params(state.params), model.config.downsample, model.config.latent_channels,
               state_lib.count_params(state.disc_params))
  if config.model.bottleneck == "vq":
    logging.info("VQ: %d codes of %d dims; codes unused for %d steps restart", config.model.codebook_size,
                 config.model.vq_dim, config.model.codebook_restart_steps)
  frozen = load_frozen_networks(config.loss, mesh)

  ckpt, state, start_step = run_dir.RunDir(workdir).open_checkpoints(config.max_to_keep, state, state_shardings,
                                                                     data_iterator)
  config_resume.record(config, workdir, accepted, start_step)
  writer = metrics_lib.MetricWriter(workdir, start_step, active=distributed.is_chief())

  steps = {adversarial: vae_step.jit_train_step(
      mesh, state_shardings, adversarial=adversarial, vae=model, disc=disc, tx=tx,
      weights=vae_step.LossWeights.of(config.loss), train_key=train_key,
      codebook_restart_steps=config.model.codebook_restart_steps) for adversarial in (False, True)}
  batch_sharding = sharding.batch_sharding(mesh)
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=not distributed.is_chief())
  images_seen, last_time = 0, time.time()
  with preemption.stop_signals(progress.close, ckpt.wait, ckpt.close, writer.close) as stop:
    for step in range(start_step + 1, config.total_steps + 1):
      local = next(data_iterator)
      batch = jax.make_array_from_process_local_data(batch_sharding, local)
      adversarial = config.loss.gan_weight > 0 and step > config.loss.gan_start_step
      with jax.set_mesh(mesh):
        state, metrics = steps[adversarial](state, batch, frozen)
      progress.update(1)
      images_seen += config.batch_size
      is_last = step == config.total_steps
      preempted = stop.reached(step)
      log, save = step % config.log_every == 0 or is_last, step % config.ckpt_every == 0 or is_last or preempted
      if log or save:
        metrics = jax.device_get(metrics)
        if not np.isfinite(metrics["loss"]):
          raise nonfinite.NonFiniteUpdate(f"VAE loss is {metrics['loss']} at step {step} ({metrics}); stopped "
                                          f"without saving, last checkpoint: step {ckpt.latest_step()}")
      if (step % config.sample_every == 0 or is_last) and not preempted:
        metrics = dict(jax.device_get(metrics), test_psnr=evaluate(step, state.params, model, test_images, workdir))
        log = True
      if log:
        now = time.time()
        metrics["images_per_sec"] = images_seen / (now - last_time)
        images_seen, last_time = 0, now
        writer.write(step, metrics)
        progress.set_postfix(l1=f"{metrics['l1']:.4f}", psnr=f"{metrics['psnr']:.1f}")
      if save:
        nonfinite.save_if_finite(ckpt, step, state, data_iterator)
      if preempted:
        logging.warning("stopped by %s: saved step %d; run the same command to resume", stop.reason, step)
        break
  return stop.exit_code


def main(argv):
  distributed.start_command(argv, ("config", "workdir"))
  run_dir.RunDir(flags.FLAGS.workdir).keep_compilations()
  return train_vae(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.allow_config_change)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "VAE experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reconstructions.")
  config_resume.define_flags()
  distributed.define_flags()
  app.run(main)
