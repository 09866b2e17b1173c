"""The Transfusion training loop (python -m tfusion.train; tfusion.ablate runs it per cell).

Training again in the same workdir resumes from the latest checkpoint that verifies, with the same config
(docs/reliability.md: what may change, allow_config_change). SIGTERM or SIGINT saves a checkpoint at the
current step and stops.
"""
import functools
import os
import time

from absl import logging
import jax
import numpy as np
import tqdm

from tfusion import (config_resume, distributed, flops, metrics as metrics_lib, run_dir, sharding,
                     spec as spec_lib, visualize, workdir_lock)
from tfusion.data import mixture, pipeline, sequence
from tfusion.evaluation import suite
from tfusion.inference import sampler as sampler_lib
from tfusion.training import nonfinite, optim, preemption, state as state_lib, step as step_lib


# ----------------------------------------------------------------------------------------------
# Samples: images from fixed test captions, captions for fixed test images.
# ----------------------------------------------------------------------------------------------
def write_samples(step, state, mesh, tok, codec, sample_examples, config, workdir):
  """Every process samples (the params are spread over all of them); process 0 writes the files."""
  examples = pipeline.take(sample_examples, max(config.sample.num_images, config.sample.num_captions))
  sampler = sampler_lib.Sampler(config, state.sampling_params, tok, mesh, codec)
  options = sampler.spec.sampling
  key = jax.random.fold_in(jax.random.key(config.seed), 1_000_000 + step)
  prompts = [mixture.decode_caption(e) for e in examples[:config.sample.num_images]]
  images = sampler.text_to_image(prompts, options, key)
  shown = np.stack([e["image"] for e in examples[:config.sample.num_captions]])
  captions = sampler.caption(shown, options, key)
  if not distributed.is_chief():
    return
  out = run_dir.RunDir(workdir).samples(step)
  os.makedirs(out, exist_ok=True)
  visualize.save_image_grid(os.path.join(out, "images.png"), images, prompts)
  visualize.save_image_grid(os.path.join(out, "captioned.png"), shown, captions)
  with open(os.path.join(out, "captions.txt"), "w") as f:
    for e, c in zip(examples, captions):
      f.write(f"truth: {mixture.decode_caption(e)}\nmodel: {c}\n\n")


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, allow_config_change: tuple[str, ...] = ()) -> int:
  """Train (or resume) the run in `workdir` to config.total_steps, holding the workdir's lock. Returns the
  process exit status: 0, or 130 after a clean stop on SIGINT. allow_config_change: config fields (or
  groups) that may differ from the recorded config on resume although they change the run."""
  spec = spec_lib.resolve(config)
  with workdir_lock.hold(workdir):
    return _train(config, spec, workdir, tuple(allow_config_change))


def _train(config, spec: spec_lib.RunSpec, workdir: str, allow_config_change: tuple[str, ...]) -> int:
  # --- Setup: the config against the run's recorded one (recorded once the run is restored). ----
  accepted = config_resume.check(config, workdir, allow=allow_config_change)
  scorers = suite.ImageScorers.from_config(config) if config.eval_every else suite.ImageScorers()

  # --- Mesh. ------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(mesh, config.batch_size, config.microbatches)
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

  # --- Data. ------------------------------------------------------------------------------------
  codec = mixture.run_codec(config, workdir)
  data = mixture.training_data(config, workdir, codec)
  tok = data.tokenizer
  special = sequence.SpecialIds.of(tok)
  model, layout = spec.transfusion(tok.vocab_size), spec.layout
  mix = pipeline.MixOptions(caption_first_prob=config.data.caption_first_prob,
                            caption_dropout_prob=config.data.caption_dropout_prob,
                            num_timesteps=config.diffusion.num_timesteps,
                            image_first_max_t=config.diffusion.image_first_max_t, seed=config.seed,
                            image_token_offset=model.cfg.image_token_offset if spec.discrete_images else 0)

  data_iterator = pipeline.train_batches(data.sources, layout, special, mix, config.batch_size,
                                         process_index=jax.process_index(), process_count=jax.process_count(),
                                         workers=config.data.workers, prefetch=config.data.prefetch)

  # --- Model, optimizer and state. ------------------------------------------------------------
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  init_batch = sequence.dummy_batch(1, layout)
  state, state_shardings = state_lib.create_train_state(model, tx, init_batch, init_key, mesh,
                                                        ema=config.ema_decay > 0)
  logging.info("parameters: %d", state_lib.count_params(state.params))
  global_batch = jax.eval_shape(lambda: sequence.dummy_batch(config.batch_size, layout))
  step_flops = flops.train_flops(model, state.params, sequence.model_inputs(global_batch))
  peak, peak_source = flops.peak_tflops_per_device(config.peak_tflops_per_device, config.model.dtype)
  logging.info("model TFLOPs per step %.3f; MFU peak %.1f TFLOP/s per device (%s)", step_flops / 1e12, peak,
               peak_source)

  # --- Restore. ---------------------------------------------------------------------------------
  ckpt, state, start_step = run_dir.RunDir(workdir).open_checkpoints(config.max_to_keep, state, state_shardings,
                                                                     data_iterator, config.init_from)
  config_resume.record(config, workdir, accepted, start_step)
  writer = metrics_lib.MetricWriter(workdir, start_step, active=distributed.is_chief())

  train_step = step_lib.jit_train_step(mesh, state_shardings, model=model, tx=tx, schedule=schedule,
                                       alpha_bar=spec.alpha_bar, loss_weight=config.diffusion.loss_weight,
                                       min_snr_gamma=config.diffusion.min_snr_gamma, z_loss_weight=config.z_loss_weight,
                                       ema_decay=config.ema_decay, train_key=train_key,
                                       microbatches=config.microbatches)
  batch_sharding = sharding.batch_sharding(mesh)
  reference = suite.reference_latents(config, codec) if config.eval_every else None
  skip_guard = None
  if config.nonfinite_skip_limit:
    skip_guard = nonfinite.SkipGuard(config.nonfinite_skip_limit)
    train_step = skip_guard.wrap(train_step, state_shardings, batch_sharding, sharding.replicated(mesh))
  samples = functools.partial(write_samples, mesh=mesh, tok=tok, codec=codec, sample_examples=data.sample_examples,
                              config=config, workdir=workdir)

  # --- Train loop. ------------------------------------------------------------------------------
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=jax.process_index() != 0)
  elements, steps_timed, last_time = 0, 0, time.time()
  # The cleanups run also on errors and interrupts: the checkpoints already started are finished.
  with preemption.stop_signals(progress.close, ckpt.wait, ckpt.close, writer.close) as stop:
    for step in range(start_step + 1, config.total_steps + 1):
      local = next(data_iterator)
      batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local)
      with jax.set_mesh(mesh):
        state, metrics = train_step(state, batch)
      skipped = skip_guard is not None and skip_guard.after_step(step, metrics)
      progress.update(1)
      steps_timed += 1
      elements += int(local["segment_ids"].astype(bool).sum()) * jax.process_count()
      is_last = step == config.total_steps
      preempted = stop.reached(step)    # SIGTERM / SIGINT: all processes save and stop at this step
      log = step % config.log_every == 0 or is_last
      save = step % config.ckpt_every == 0 or is_last or preempted
      if log or save:
        metrics = jax.device_get(metrics)
        if not np.isfinite(metrics["loss"]) and not skipped:
          raise nonfinite.NonFiniteUpdate(
              f"loss is {metrics['loss']} at step {step} (text_loss {metrics['text_loss']}, image_loss "
              f"{metrics['image_loss']}); stopped without saving, last checkpoint: step {ckpt.latest_step()}")
      if log:
        now = time.time()
        metrics["elements_per_sec"] = elements / (now - last_time)
        metrics["packing_efficiency"] = elements / (steps_timed * config.batch_size * config.seq_len)
        metrics["tflops_per_device"] = step_flops * steps_timed / (now - last_time) / jax.device_count() / 1e12
        metrics["mfu"] = metrics["tflops_per_device"] / peak
        elements, steps_timed, last_time = 0, 0, now
        if skip_guard is not None:
          metrics["skipped_steps"] = skip_guard.take_count()
        writer.write(step, {k: v for k, v in metrics.items() if k not in ("elements", "skipped")})
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", text=f"{metrics['text_loss']:.3f}",
                             image=f"{metrics['image_loss']:.3f}")
      if save:
        nonfinite.save_if_finite(ckpt, step, state, data_iterator)
      if preempted:
        logging.warning("stopped by %s: saved step %d; run the same command to resume", stop.reason, step)
        break
      if (step % config.sample_every == 0 or is_last) and data.sample_examples is not None:
        samples(step, state)
      if config.eval_every and (step % config.eval_every == 0 or is_last) and data.sample_examples is not None:
        sampler = sampler_lib.Sampler(config, state.sampling_params, tok, mesh, codec, step=step,
                                      weights="raw" if state.ema_params is None else "ema")
        report = suite.evaluate(sampler, data.sample_examples, step, config.eval_examples, config.seed, scorers,
                                reference)
        suite.write_report(workdir, report)
        writer.write(step, suite.scalars(report))
  return stop.exit_code
