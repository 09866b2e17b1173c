r"""Per-device memory plan of paper-size train steps, compiled ahead of time for real TPU topologies.

  pip install -e .[tpu]      # the TPU compiler (libtpu) runs on any host, compile-only
  python benchmarks/memory_plan.py [--only 7b] [--out benchmarks/results/memory_plan.json]

Each row runs `python -m tfusion.aot` in its own process (a row that does not fit fails at
compile time with RESOURCE_EXHAUSTED; that is reported, not raised). Prints a table, writes JSON.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, experiment[:arg], topology, tfusion.aot flags and config overrides)
PLANS = [
    ("7b linear, remat full, chunked attn", "transfusion_paper.py:size=7b", "v5p:4x4x8", []),
    ("7b linear, remat dots_saveable", "transfusion_paper.py:size=7b", "v5p:4x4x8", ["--config.model.remat_policy=dots_saveable"]),
    ("7b linear, no remat", "transfusion_paper.py:size=7b", "v5p:4x4x8", ["--config.model.remat_policy=none"]),
    ("7b linear, dense attn", "transfusion_paper.py:size=7b", "v5p:4x4x8", ["--config.model.attention=dense"]),
    ("7b unet, remat full", "transfusion_paper.py:size=7b,encoder=unet", "v5p:4x4x8", []),
    ("7b linear on v4-256", "transfusion_paper.py:size=7b", "v4:4x4x8", []),
    ("7b linear, 2 slices v5p-128 (dcn data 2)", "transfusion_paper.py:size=7b", "v5p:4x4x4",
     ["--num_slices=2", "--config.mesh.dcn_data_parallelism=2"]),
    ("7b linear on v5p-16, 8 microbatches", "transfusion_paper.py:size=7b", "v5p:2x2x2", ["--config.microbatches=8"]),
    ("1.4b linear", "transfusion_paper.py:size=1.4b", "v5p:2x2x2", ["--config.microbatches=4"]),
    ("0.16b linear, no remat, 8 microbatches", "transfusion_paper.py:size=160m", "v5p:2x2x2",
     ["--config.model.remat_policy=none", "--config.microbatches=8"]),
]


def run(label, experiment, topology, overrides):
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    cmd = [sys.executable, "-m", "tfusion.aot", "--config", os.path.join("experiments", experiment),
           "--topology", topology, "--json", out.name, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    row = {"label": label, "experiment": experiment, "topology": topology, "overrides": overrides}
    if proc.returncode:
      lines = [line for line in proc.stderr.splitlines() if "RESOURCE_EXHAUSTED" in line or "Error" in line]
      row["error"] = (lines[-1] if lines else proc.stderr.strip().splitlines()[-1])[:300]
      return row
    return {**row, **json.load(open(out.name))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", default=[], help="run only the rows whose label contains one of these")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "memory_plan.json"))
  args = parser.parse_args()
  rows = []
  print(f"{'plan':<40}{'topology':<12}{'GiB/dev peak':>13}{'args+temp':>11}{'params':>8}{'opt':>7}{'TFLOP/dev':>10}")
  for plan in PLANS:
    if args.only and not any(part in plan[0] for part in args.only):
      continue
    row = run(*plan)
    rows.append(row)
    if "error" in row:
      print(f"{row['label']:<40}{row['topology']:<12}  FAILED: {row['error'][:120]}")
      continue
    gib = lambda k: row[k] / 2**30  # noqa: E731
    print(f"{row['label']:<40}{row['topology']:<12}{gib('peak_bytes'):>13.2f}{gib('live_bound_bytes'):>11.2f}"
          f"{gib('params_bytes'):>8.2f}{gib('optimizer_bytes'):>7.2f}{row['model_tflops_per_device']:>10.1f}")
  # Rows of earlier runs (e.g. with --only) are kept unless measured again; the table's order is PLANS'.
  previous = json.load(open(args.out)) if os.path.exists(args.out) else []
  labels = [plan[0] for plan in PLANS]
  merged = {row["label"]: row for row in previous + rows if row["label"] in labels}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(sorted(merged.values(), key=lambda row: labels.index(row["label"])), f, indent=2)


if __name__ == "__main__":
  main()
