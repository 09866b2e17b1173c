r"""Train Transfusion: python -m tfusion.train --config experiments/shapes_tiny.py --workdir DIR.

Running the same command again in the same workdir resumes from the latest checkpoint that verifies,
with the same config (docs/reliability.md: what may change, --allow_config_change). SIGTERM or SIGINT
saves a checkpoint at the current step and stops. Overrides: --config.total_steps=2000
--config.model.num_layers=8 ...; `--config experiments/x.py:arg` passes `arg` to the experiment's get_config.
The loop is tfusion/training/trainer.py.
"""
from absl import app, flags
from ml_collections import config_flags

from tfusion import config_resume, distributed, run_dir
from tfusion.training import trainer


def main(argv):
  distributed.start_command(argv, ("config", "workdir"))
  args = flags.FLAGS
  run_dir.RunDir(args.workdir).keep_compilations()
  return trainer.train_and_evaluate(args.config, args.workdir, args.allow_config_change)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
  config_resume.define_flags()
  distributed.define_flags()
  app.run(main)
