"""Multi-host start-up: join JAX's distributed runtime before any device is touched.

Every process runs the same command. Explicit coordinates (coordinator address, process count and
id) work anywhere, including several processes on one machine; otherwise JAX's cluster detection
(Cloud TPU VMs, SLURM, Open MPI, Kubernetes) supplies them. A single process needs neither.
"""
import os

from absl import app, flags, logging
import jax
from jax.experimental import multihost_utils
import numpy as np

MODES = ("auto", "on", "off")


def cluster_detected() -> bool:
  """True inside a multi-process SLURM job or on a multi-host Cloud TPU slice."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Call jax.distributed.initialize when this is one process of several.

  mode: "on" always joins (JAX detects the cluster unless coordinates are given), "off" never,
  "auto" joins when coordinates are given or cluster_detected().
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: must be one of {MODES}")
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together: give all three "
                     f"or none (got {explicit})")
  if mode == "off" or (mode == "auto" and coordinator_address is None and not cluster_detected()):
    return
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def define_flags() -> None:
  """The multi-process flags every command takes (read by start_command)."""
  flags.DEFINE_enum("distributed", "auto", MODES,
                    "Join JAX's multi-process runtime: auto (when the flags below are given or a SLURM / "
                    "multi-host Cloud TPU job is detected), on (always), off.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def start_command(argv, required: tuple[str, ...]) -> None:
  """The common start of the commands: checks argv and the `required` flags, quiets orbax's INFO logs and
  joins the multi-process runtime (flags of define_flags())."""
  quiet_library_info_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  if any(args[name].value is None for name in required):
    raise app.UsageError(" and ".join(f"--{name}" for name in required) + " are required")
  initialize(args.distributed, args.coordinator_address, args.num_processes, args.process_id)


def is_chief() -> bool:
  return jax.process_index() == 0


def chief_first(name: str, fn):
  """fn() on process 0, then (after all processes meet) on the others: files fn writes on first use
  (a built dataset, a trained tokenizer) are written once and read by everyone else."""
  if is_chief():
    result = fn()
  multihost_utils.sync_global_devices(name)
  if not is_chief():
    result = fn()
  return result


def chief_only(name: str, fn):
  """fn() on process 0 only (e.g. a decision about shared files), its outcome shared with every process:
  returns fn()'s result on process 0 and None on the others once it succeeded; if it raised, process 0
  re-raises and the others raise a RuntimeError pointing at process 0's log."""
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if is_chief():
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, after the others learn of it)
      error = e
  failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(f"{name} failed on process 0: see its log")
  return result


def chief_decides(name: str, fn) -> int | None:
  """chief_only for an fn that returns a non-negative int or None (e.g. a step chosen from shared files):
  every process returns process 0's result."""
  result = chief_only(name, fn)
  if jax.process_count() == 1:
    return result
  shared = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if result is None else result)))
  return None if shared < 0 else shared


def quiet_library_info_logs() -> None:
  """Orbax logs every checkpoint step at INFO; keep its warnings, drop the chatter."""
  def keep(record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname
  logging.get_absl_handler().python_handler.addFilter(keep)
