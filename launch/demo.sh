#!/usr/bin/env bash
# The README demo, the whole latent pipeline on the embedded shapes data (no download):
#   1. train a small KL-VAE on the shapes images            -> ROOT/vae
#   2. encode the dataset once into cached latents          -> ROOT/latents
#   3. train Transfusion on the latents, with samples       -> ROOT/transfusion
# launch/demo.sh [ROOT (default workdir/demo)]; PYTHON picks the interpreter (default: python).
# Each stage resumes or skips finished work when run again.
set -euo pipefail
root=${1:-workdir/demo}
python=${PYTHON:-python}
"$python" -m tfusion.train_vae --config experiments/vae_shapes.py --workdir "$root/vae"
"$python" -m tfusion.encode_latents --config "experiments/shapes_latent.py:$root"
"$python" -m tfusion.train --config "experiments/shapes_latent.py:$root" --workdir "$root/transfusion"
