r"""Parameter counts by component: python -m tfusion.params --config experiments/transfusion_paper.py:size=7b,encoder=unet

Nothing is allocated (shapes only), so any size runs on a laptop. The transformer (with its text
embedding and LM head) is compared with the paper's Table 2 sizes.
"""
import math

from absl import app, flags
import jax
from ml_collections import config_flags

from tfusion import config as config_lib, spec as spec_lib
from tfusion.data import sequence

# Nominal sizes of paper Table 2, by (num_layers, d_model).
PAPER_NOMINAL = {v[:2]: float(k[:-1]) * (1e9 if k.endswith("b") else 1e6) for k, v in config_lib.PAPER_SIZES.items()}
COMPONENTS = (("token_embedding", "text embedding"), ("transformer", "transformer layers"),
              ("lm_head", "LM head"), ("patch_encoder", "patch encoder"), ("patch_decoder", "patch decoder"))


def count_by_component(config) -> dict[str, int]:
  """{top-level param collection: parameter count} of the config's model (vocab from config.data)."""
  spec = spec_lib.resolve(config)
  model = spec.transfusion(config.data.vocab_size)
  batch = sequence.dummy_batch(1, spec.layout)
  shapes = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x), *sequence.model_inputs(batch))
  params = shapes["params"]
  return {name: sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) for name, tree in params.items()}


def report(config) -> str:
  counts = count_by_component(config)
  total = sum(counts.values())
  lines = [f"{'component':<22}{'parameters':>16}{'share':>9}"]
  for key, label in COMPONENTS:
    lines.append(f"{label:<22}{counts[key]:>16,}{counts[key] / total:>9.1%}")
  lines.append(f"{'total':<22}{total:>16,}")
  backbone = counts["token_embedding"] + counts["transformer"] + counts["lm_head"]
  codec = counts["patch_encoder"] + counts["patch_decoder"]
  lines.append(f"{'transformer + text emb':<22}{backbone:>16,}")
  lines.append(f"{config.model.patch_encoder + ' enc/dec':<22}{codec:>16,}{codec / backbone:>9.1%}  of the transformer")
  nominal = PAPER_NOMINAL.get((config.model.num_layers, config.model.d_model))
  if nominal:
    lines.append(f"paper Table 2 size {nominal / 1e9:.2f}B: transformer + text embeddings = {backbone / nominal:.1%} of it")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  print(report(config))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  app.run(main)
