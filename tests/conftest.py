"""Test set-up: 8 fake CPU devices and -O0 compiles (before jax is imported), parsed absl flags, a compile
cache; fixtures."""
import os
import tempfile

# LLVM at -O0: the suite's tiny programs are compiled far more often than they run, and XLA:CPU compiles
# them about 3x faster this way (a tiny U-Net model's init: 2.9 s against 9.8 s). Same HLO, same ops;
# only the machine code's speed and f32 rounding in the last bits differ, so comparisons are relative.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

from absl import flags  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# grain worker processes read absl flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()

# Many tests compile the same programs (e.g. a run and its resumed twin): share compilations
# across tests and xdist workers through JAX's persistent cache.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "tfusion_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: multi-process runs of several minutes; left out by pytest.ini, run with -m slow")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The directory of the shapes data the tiny runs build (once per worker)."""
  return str(tmp_path_factory.mktemp("tfds"))
