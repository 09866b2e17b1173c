#!/usr/bin/env bash
# Train on this machine: launch/local.sh [experiment file] [workdir] [extra flags...]
#   launch/local.sh experiments/shapes_tiny.py /tmp/tfusion_shapes --config.total_steps=1000
set -euo pipefail
config=${1:-experiments/shapes_tiny.py}
workdir=${2:-workdir/$(basename "$config" .py)}
shift $(( $# < 2 ? $# : 2 ))
exec python -m tfusion.train --config "$config" --workdir "$workdir" "$@"
