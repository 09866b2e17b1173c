"""The layers of docs/architecture.md, read from the imports of every module (also those inside functions).

  commands (train, generate, ...)      import the libraries, never each other
  training/                            joins models, data, inference and evaluation
  inference/, evaluation/              models, data, run_dir, spec; never training or a command
  data/                                no model code
  models/, diffusion.py, masks.py      nothing of data, training, inference, evaluation or the commands
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tfusion")
COMMANDS = {f"tfusion.{name}" for name in ("train", "train_vae", "generate", "evaluate", "export", "prepare",
                                            "encode_latents", "ablate", "aot", "params")}


def module_names() -> dict[str, str]:
  """{dotted module name: file path} of every module of the package."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for file in files:
      if file.endswith(".py"):
        path = os.path.join(root, file)
        parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


MODULES = module_names()


def imports(name: str) -> set[str]:
  """The tfusion modules `name` imports (`from tfusion import x` counts as tfusion.x when x is a module)."""
  with open(MODULES[name]) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names}
  return {m for m in found if m == "tfusion" or m.startswith("tfusion.")}


def under(module: str, *prefixes: str) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_package_is_found():
  assert {"tfusion.run_dir", "tfusion.spec", "tfusion.inference.sampler", "tfusion.evaluation.suite"} <= set(MODULES)
  assert COMMANDS <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
  found = imports(name)
  if under(name, "tfusion.models") or name in ("tfusion.diffusion", "tfusion.masks"):
    allowed = {m for m in found if under(m, "tfusion.models", "tfusion.diffusion", "tfusion.masks")}
    assert found == allowed, f"{name} imports {sorted(found - allowed)}: models know nothing of the layers above"
  if under(name, "tfusion.data"):
    assert not {m for m in found if under(m, "tfusion.models", "tfusion.training", "tfusion.inference",
                                          "tfusion.evaluation")}, f"{name}: data has no model code"
  if under(name, "tfusion.inference", "tfusion.evaluation"):
    assert not {m for m in found if under(m, "tfusion.training")}, f"{name} imports training"
  if name in COMMANDS:
    assert not found & (COMMANDS - {name}), f"the command {name} imports another command"
  else:
    assert not found & COMMANDS, f"the library module {name} imports a command: {sorted(found & COMMANDS)}"
