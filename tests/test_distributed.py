"""When tfusion joins JAX's multi-process runtime (the runtime itself: tests/test_multihost.py)."""
import jax
import pytest

from tfusion import distributed


@pytest.fixture
def calls(monkeypatch):
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
  for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  return made


def test_a_single_process_does_not_join(calls):
  distributed.initialize("auto")
  assert calls == []


@pytest.mark.parametrize("var, value", [("SLURM_NTASKS", "16"), ("TPU_WORKER_HOSTNAMES", "h0,h1")])
def test_auto_joins_on_a_detected_cluster_and_off_never_does(calls, monkeypatch, var, value):
  monkeypatch.setenv(var, value)
  distributed.initialize("off")
  assert calls == []
  distributed.initialize("auto")
  assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_explicit_coordinates_are_passed_on(calls):
  distributed.initialize("auto", "127.0.0.1:1234", 2, 1)
  assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)]


def test_partial_coordinates_and_bad_modes_are_refused(calls):
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("auto", "127.0.0.1:1234", None, 0)
  with pytest.raises(ValueError, match="must be one of"):
    distributed.initialize("sometimes")
  assert calls == []


def test_what_process_0_decides_reaches_every_process(monkeypatch):
  """Process 1 of 2, faked: it does not call fn and returns what process 0 broadcast (first its success)."""
  sent = iter([0, 7, 0, -1])
  monkeypatch.setattr(distributed.multihost_utils, "broadcast_one_to_all", lambda local: next(sent))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert distributed.chief_decides("choosing", lambda: pytest.fail("fn runs on process 0 only")) == 7
  assert distributed.chief_decides("choosing", lambda: pytest.fail("fn runs on process 0 only")) is None
