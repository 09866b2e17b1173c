r"""Transfusion 760M at the paper's settings (Table 2, §4.1); `:unet` selects the U-Net patch encoder.

  python -m tfusion.params --config experiments/transfusion_760m.py:unet
  python -m tfusion.aot --config experiments/transfusion_760m.py --topology v5p:4x4x8
  launch/tpu_pod.sh TPU_NAME ZONE experiments/transfusion_760m.py gs://BUCKET/transfusion_760m
"""
from tfusion.config import paper_config


def get_config(arg="linear"):
  """arg: the patch encoder, linear (default) or unet."""
  return paper_config("760m", arg or "linear")
