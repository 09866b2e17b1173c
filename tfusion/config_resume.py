"""A resumed run keeps its config: compare the new config with the one the workdir recorded.

Fields that change what is trained (model, data, batch, seed, optimizer, diffusion; and any field added
later, by default) are refused, each named with its old and new value, and config.json stays as it
was. The fields of MAY_CHANGE only change when and how the same run is computed, logged, saved or
sampled: their changes are accepted, logged, written to config.json and appended to
config_changes.jsonl. An explicit override (--allow_config_change=optim.lr,... on the command line)
forces other changes through, with a warning and the same record.

A trainer calls check() before any compute and record() once its run is restored: a run refused later
(a shape that does not restore, a data position that refuses the new data, a bad mesh, no checkpoint
that verifies) leaves config.json and config_changes.jsonl as they were, and the record names the step
the run actually resumed from.
"""
import datetime
import json
import os

from absl import flags, logging
import ml_collections

from tfusion import config as config_lib, distributed, run_dir

# Fields (or groups, "mesh" = mesh.*) whose change on resume continues the same run.
MAY_CHANGE = (
    "total_steps",             # the lr schedule's horizon moves with it (warned)
    "log_every", "ckpt_every", "sample_every", "eval_every", "eval_examples", "max_to_keep",
    "peak_tflops_per_device", "eval_inception_weights", "eval_clip",
    "nonfinite_skip_limit",    # what happens on a NaN, not what is trained
    "microbatches",            # the same update, accumulated in another number of slices
    "model.remat_policy", "model.attention", "model.attention_chunk",   # the same function, computed otherwise
    "data.workers", "data.prefetch", "data.sample_split",
    "sample", "mesh",
)


class ConfigChangeError(config_lib.ConfigError):
  """The new config changes fields a resumed run may not change; the message names each."""


def flatten(config: ml_collections.ConfigDict) -> dict:
  """{"group.field": value} with tuples as lists (as JSON has them)."""
  flat = {}

  def visit(prefix, value):
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      for key, item in value.items():
        visit(f"{prefix}.{key}" if prefix else key, item)
    else:
      flat[prefix] = list(value) if isinstance(value, tuple) else value
  visit("", config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  return flat


def _matches(field: str, names) -> bool:
  return any(field == n or field.startswith(n + ".") for n in names)


def changes(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict:
  """{field: (old, new)} of the fields that differ; a field only one side has is None on the other."""
  a, b = flatten(old), flatten(new)
  return {f: (a.get(f), b.get(f)) for f in sorted(set(a) | set(b)) if f not in a or f not in b or a[f] != b[f]}


def check(config, workdir: str, defaults: ml_collections.ConfigDict | None = None, allow: tuple[str, ...] = ()) -> dict:
  """Before any compute: compare `config` with <workdir>/config.json (read by config.from_json over
  `defaults`, None for a Transfusion run, so a workdir recorded before newer fields existed compares the
  values of its time) when the workdir has checkpoints to resume. Refuses as the module says, touching
  nothing; checkpoints without config.json are warned about. Returns the accepted {field: (old, new)}, for
  record()."""
  run = run_dir.RunDir(workdir)
  unknown = [name for name in allow if not any(_matches(f, [name]) for f in flatten(config))]
  if unknown:
    raise config_lib.ConfigError(f"--allow_config_change names fields the config does not have: {unknown}")
  if not run.saved_steps():
    return {}
  if not os.path.isfile(run.config_file):
    logging.warning("%s has checkpoints but no %s: this config cannot be compared with the run's, it is "
                    "taken as it is and recorded", workdir, os.path.basename(run.config_file))
    return {}
  saved = run.read_config(defaults)
  found = changes(saved, config)
  refused = {f: v for f, v in found.items() if not _matches(f, MAY_CHANGE) and not _matches(f, allow)}
  if refused:
    raise ConfigChangeError(
        f"{workdir} holds a run with another config; resuming it may not change "
        + "; ".join(f"config.{f} from {o!r} to {n!r}" for f, (o, n) in refused.items())
        + f". {run.config_file} was left as it was. Use a new workdir for a new run, or pass "
        f"--allow_config_change={','.join(refused)} to force the change into this run.")
  return found


def record(config, workdir: str, found: dict, step: int) -> None:
  """Once the run is restored at `step` (0 for a new run): process 0 logs the changes check() accepted,
  appends them with that step to config_changes.jsonl, and writes `config` to config.json (a .tmp file
  renamed into place, so a reader never sees half of it)."""
  if not distributed.is_chief():
    return
  for f, (o, n) in found.items():
    forced = not _matches(f, MAY_CHANGE)
    (logging.warning if forced or f == "total_steps" else logging.info)(
        "config.%s changed on resume: %r -> %r%s", f, o, n,
        " (forced by --allow_config_change)" if forced else
        " (the lr schedule follows the new total)" if f == "total_steps" else "")
  if found:
    entry = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), step=step,
                 changed={f: [o, n] for f, (o, n) in found.items()},
                 forced=[f for f in found if not _matches(f, MAY_CHANGE)])
    with open(run_dir.RunDir(workdir).config_changes_file, "a") as f:
      f.write(json.dumps(entry) + "\n")
  run_dir.RunDir(workdir).write_config(config)


def define_flags() -> None:
  """--allow_config_change of the training commands (read by their main)."""
  flags.DEFINE_list("allow_config_change", [], "Config fields or groups (e.g. optim.lr,optim.warmup_steps or optim) "
                    "that may change on resume although they change the run; the change is logged and recorded.")
