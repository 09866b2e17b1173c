r"""Evaluate a training run: python -m tfusion.evaluate --workdir RUN [--step N] [--num_examples 64].

Writes <workdir>/eval/step_<N>.json and prints its numbers; the suite is tfusion/evaluation/suite.py.
"""
import json

from absl import app, flags, logging

from tfusion import config as config_lib, distributed
from tfusion.data import mixture
from tfusion.evaluation import suite
from tfusion.inference import sampler as sampler_lib


def main(argv):
  distributed.start_command(argv, ("workdir",))
  args = flags.FLAGS
  sampler = sampler_lib.load(args.workdir, args.step, weights=args.weights)
  config = sampler.config
  with config.unlocked():
    for field in ("eval_inception_weights", "eval_clip"):
      if args[field].present:
        config[field] = args[field].value
  scorers = suite.ImageScorers.from_config(config)
  test = mixture.sample_examples(config, sampler.codec)
  if test is None:
    raise config_lib.ConfigError(f"{args.workdir}: the run has no held-out images (config.data.sample_split = "
                                 f"{config.data.sample_split!r})")
  report = suite.evaluate(sampler, test, sampler.step, args.num_examples, config.seed, scorers,
                          suite.reference_latents(config, sampler.codec))
  path = suite.write_report(args.workdir, report)
  logging.info("wrote %s", path)
  print(json.dumps(suite.scalars(report), indent=2))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run directory (config.json, tokenizer.model, checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("weights", "ema", sampler_lib.WEIGHTS, "ema: the params' moving average when the run keeps "
                    "one; raw: the trained params.")
  flags.DEFINE_integer("num_examples", 64, "Held-out images captioned and captions drawn.")
  flags.DEFINE_string("eval_inception_weights", "", "FID Inception-v3 safetensors (default: the run's config; "
                      "'' = no FID).")
  flags.DEFINE_string("eval_clip", "", "Hugging Face CLIP directory (default: the run's config; '' = no CLIP score).")
  distributed.define_flags()
  app.run(main)
