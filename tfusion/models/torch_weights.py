"""Weights saved by torch (safetensors) <-> Flax params, for the frozen networks (LPIPS, MoCo).

A layout maps each torch name to (Flax key path, torch shape). Conv kernels are OIHW in torch and HWIO
in Flax; every other array keeps its shape.
"""
import os

from flax import traverse_util
import numpy as np
import safetensors.numpy

Layout = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


def read_tensors(path: str, what: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} weight file not found: {path}")
  return safetensors.numpy.load_file(path)


def params_from_torch(tensors: dict[str, np.ndarray], layout: Layout, what: str, path: str) -> dict:
  """float32 numpy params from exactly the names and shapes of `layout`; ValueError names what differs."""
  missing, unexpected = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
  if missing or unexpected:
    raise ValueError(f"{what} weight file {path}: missing keys {missing}, unexpected keys {unexpected}")
  wrong = [f"{name} {tensors[name].shape} (expected {shape})" for name, (_, shape) in layout.items()
           if tensors[name].shape != shape]
  if wrong:
    raise ValueError(f"{what} weight file {path}: wrong shapes: {', '.join(wrong)}")
  flat = {}
  for name, (key, _) in layout.items():
    value = tensors[name].astype(np.float32)
    flat[key] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value          # OIHW -> HWIO
  return traverse_util.unflatten_dict(flat)


def save_torch(path: str, params, layout: Layout) -> None:
  """Write params to a safetensors file in the torch names and layouts of `layout`."""
  flat = traverse_util.flatten_dict(params)
  tensors = {}
  for name, (key, _) in layout.items():
    value = np.asarray(flat[key], np.float32)
    tensors[name] = np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value)  # HWIO -> OIHW
  safetensors.numpy.save_file(tensors, path)
