r"""Run config variants x seeds and tabulate their evaluations: the paper's ablations at any scale.

  python -m tfusion.ablate --config experiments/ablations.py:lambda --workdir DIR [--only VARIANT:SEED] [--collect]

The config holds `base` (a training config), `variants` (name -> overrides of base, nested like the config)
and `seeds`. Every (variant, seed) trains in DIR/<variant>/seed_<seed> with evaluation at its last step, one
after the other here; on a cluster, launch one job per cell with --only and then --collect. A finished cell
(its final eval report exists) is not rerun, an interrupted one resumes. SIGTERM or Ctrl-C saves the cell
in training and stops the ablation there (exit 0 or 130); the same command goes on. DIR/results.json and results.md hold
per variant the mean and standard deviation over seeds of every evaluation number and of the final losses,
and the training FLOPs counted as 6 N D (N parameters, D elements trained on; paper §4.2).

An optional `methods` (variant -> method, e.g. "transfusion" or "chameleon") makes it a scaling study (paper
§4.2, Table 3): the variants are each method's model sizes x token budgets, and collecting also writes
DIR/scaling.json (per metric and method the points and log-log trendline, and the parity FLOP ratio of
transfusion against chameleon's largest run), DIR/table3.md and DIR/scaling.png (evaluation/scaling_laws.py).
"""
import json
import os

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from tfusion import config as config_lib, distributed, metrics, run_dir, spec as spec_lib
from tfusion.data import sequence
from tfusion.evaluation import scaling_laws, suite
from tfusion.training import state as state_lib, trainer

FINAL_LOSSES = ("loss", "text_loss", "image_loss")


def scaling_methods(ablation) -> dict[str, str]:
  """config.methods as a dict (empty without the field); a ConfigError names an entry of an unknown variant or a
  missing reference or candidate method."""
  methods = dict(ablation.get("methods") or {})
  for variant in methods:
    if variant not in ablation.variants:
      raise config_lib.ConfigError(f"config.methods.{variant}: not a variant (variants {list(ablation.variants)})")
  for method in (scaling_laws.REFERENCE, scaling_laws.CANDIDATE):
    if methods and method not in methods.values():
      raise config_lib.ConfigError(f"config.methods: no variant of the method {method!r}")
  return methods


def cell_config(ablation, variant: str, seed: int) -> ml_collections.ConfigDict:
  """The training config of one cell: base, the variant's overrides, the seed, evaluation at the end."""
  config = ml_collections.ConfigDict(ablation.base.to_dict())
  flat = {}

  def flatten(prefix, node):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        flatten(f"{prefix}{key}.", value)
      else:
        flat[f"{prefix}{key}"] = value

  flatten("", ablation.variants[variant])
  for dotted, value in flat.items():
    *groups, last = dotted.split(".")
    node = config
    for group in groups:
      node = node.get(group) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or last not in node:
      raise config_lib.ConfigError(f"config.variants.{variant}.{dotted}: not a field of the base config")
    node[last] = value
  config.seed = seed
  config.eval_every = config.total_steps
  spec_lib.resolve(config)
  return config


def cell_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed_{seed}")


def run_cell(ablation, workdir: str, variant: str, seed: int) -> tuple[int, bool]:
  """Trains one cell to its end, unless it is finished. Returns (exit status, finished): the training's
  status (0, or 130 after Ctrl-C) and whether the cell reached its last step, which it has not after a
  SIGTERM (saved, exit 0) or a Ctrl-C."""
  config = cell_config(ablation, variant, seed)
  directory = cell_dir(workdir, variant, seed)
  if os.path.isfile(run_dir.RunDir(directory).eval_report(config.total_steps)):
    logging.info("%s is finished", directory)
    return 0, True
  status = trainer.train_and_evaluate(config, directory)
  return status, config.total_steps in run_dir.RunDir(directory).saved_steps()


def run_all(ablation, workdir: str) -> int | None:
  """Every cell in turn. Stops at the first cell that stops before its last step (a signal) and returns that
  training's exit status (0 after SIGTERM, 130 after Ctrl-C); None once every cell is finished."""
  for variant in ablation.variants:
    for seed in ablation.seeds:
      status, finished = run_cell(ablation, workdir, variant, seed)
      if status or not finished:
        logging.warning("stopped in %s; run the same command to go on", cell_dir(workdir, variant, seed))
        return status
  return None


def cell_numbers(ablation, workdir: str, variant: str, seed: int) -> dict[str, float] | None:
  """The evaluation numbers, final losses and 6ND FLOPs of one finished cell (None if unfinished)."""
  config = cell_config(ablation, variant, seed)
  directory = cell_dir(workdir, variant, seed)
  path = run_dir.RunDir(directory).eval_report(config.total_steps)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    numbers = suite.scalars(json.load(f))
  logged = [m for m in metrics.read_metrics(directory) if "loss" in m]
  numbers.update({f"final/{k}": logged[-1][k] for k in FINAL_LOSSES})
  numbers["params"] = float(_param_count(config, directory))
  numbers["flops_6nd"] = 6.0 * numbers["params"] * config.total_steps * config.batch_size * config.seq_len
  return numbers


def _param_count(config, directory: str) -> int:
  spec = spec_lib.resolve(config)
  model = spec.transfusion(run_dir.RunDir(directory).tokenizer().vocab_size)
  batch = sequence.dummy_batch(1, spec.layout)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *sequence.model_inputs(batch)))
  return state_lib.count_params(shapes)


def _summary(values: list[float]) -> dict:
  return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
              values=values)


def collect(ablation, workdir: str) -> dict:
  """results.json and results.md: per variant and number, mean, std (ddof 1) and the seeds it covers; for every
  variant after the first (the baseline), the per-seed differences to the baseline over the seeds both have:
  seeds move both arms alike (same data order, held-out split and noise), so paired differences are far less
  noisy than the two means. With config.methods (a scaling study, whose variants are no arms of one comparison)
  no paired differences, and scaling.json, table3.md and scaling.png."""
  methods = scaling_methods(ablation)
  table, cells = {}, {}
  for variant in ablation.variants:
    numbers = {seed: cell_numbers(ablation, workdir, variant, seed) for seed in ablation.seeds}
    cells[variant] = {seed: n for seed, n in numbers.items() if n is not None}
    done = cells[variant]
    keys = sorted(set().union(*[n.keys() for n in done.values()])) if done else []
    table[variant] = {"seeds": sorted(done), "missing_seeds": sorted(set(numbers) - set(done)), "numbers": {
        key: _summary([done[s][key] for s in sorted(done) if key in done[s]]) for key in keys}}
  baseline, *others = list(ablation.variants)
  for variant in [] if methods else others:
    seeds = sorted(set(cells[variant]) & set(cells[baseline]))
    keys = sorted(set().union(*[cells[variant][s].keys() & cells[baseline][s].keys() for s in seeds])) if seeds else []
    table[variant]["paired"] = {"baseline": baseline, "seeds": seeds, "differences": {
        key: _summary([cells[variant][s][key] - cells[baseline][s][key] for s in seeds]) for key in keys}}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(table, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown_table(table))
  if methods:
    report = scaling_laws.scaling_report(table, methods)
    with open(os.path.join(workdir, "scaling.json"), "w") as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "table3.md"), "w") as f:
      f.write(scaling_laws.table3_markdown(report))
    scaling_laws.plot(report, os.path.join(workdir, "scaling.png"))
  return table


def markdown_table(table: dict) -> str:
  """Numbers as rows; variants as columns ("mean ± std"), then each variant's paired difference to the
  baseline ("mean ± std, n seeds")."""
  variants = list(table)
  paired = [v for v in variants if "paired" in table[v]]
  keys = sorted(set().union(*[t["numbers"].keys() for t in table.values()]))
  lines = ["| number | " + " | ".join(
      [f"{v} ({len(table[v]['seeds'])} seeds)" for v in variants]
      + [f"{v} - {table[v]['paired']['baseline']} (paired, {len(table[v]['paired']['seeds'])} seeds)"
         for v in paired]) + " |",
           "|---|" + "---|" * (len(variants) + len(paired))]
  for key in keys:
    summaries = [table[v]["numbers"].get(key) for v in variants]
    summaries += [table[v]["paired"]["differences"].get(key) for v in paired]
    cells = ["" if n is None else f"{n['mean']:.4g} ± {n['std']:.2g}" for n in summaries]
    lines.append(f"| {key} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  distributed.start_command(argv, ("config", "workdir"))
  args = flags.FLAGS
  ablation = args.config
  scaling_methods(ablation)   # a bad config.methods fails before any cell trains
  if args.only:
    variant, seed = args.only.rsplit(":", 1)
    if variant not in ablation.variants or int(seed) not in ablation.seeds:
      raise app.UsageError(f"--only {args.only}: variants {list(ablation.variants)}, seeds {list(ablation.seeds)}")
    return run_cell(ablation, args.workdir, variant, int(seed))[0]
  if not args.collect:
    stopped = run_all(ablation, args.workdir)
    if stopped is not None:
      return stopped
  print(markdown_table(collect(ablation, args.workdir)))
  if scaling_methods(ablation):
    with open(os.path.join(args.workdir, "table3.md")) as f:
      print(f.read())
  return 0


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Ablation config (base, variants, seeds[, methods]).",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Directory of the ablation (one subdirectory per variant and seed).")
  flags.DEFINE_string("only", None, "Run one cell, VARIANT:SEED (a cluster job).")
  flags.DEFINE_bool("collect", False, "Only collect the finished cells into results.json / results.md "
                    "(and scaling.json, table3.md, scaling.png with methods).")
  distributed.define_flags()
  app.run(main)
