"""tfusion: Transfusion (Zhou et al., 2024) pretraining in JAX/Flax."""


def load(path: str, mesh=None):
  """A ready inference Sampler from an export directory written by python -m tfusion.export."""
  from tfusion.inference import sampler  # pylint: disable=import-outside-toplevel  (import tfusion stays light)
  return sampler.load_export(path, mesh)
