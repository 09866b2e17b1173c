"""Multi-host start-up: join JAX's distributed runtime before any device is touched.

Every process runs the same command. Explicit coordinates (coordinator address, process count and
id) work anywhere, including several processes on one machine; otherwise JAX's cluster detection
(Cloud TPU VMs, SLURM, Open MPI, Kubernetes) supplies them. A single process needs neither.
"""
import os

import jax

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
