#!/usr/bin/env bash
# The main job on the embedded synthetic default: sets up .venv if needed, then runs every stage.
# Extra arguments go to clfc_jax.main (e.g. --stages=prep or --config.train.epochs=2).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m clfc_jax.main --config=configs/demo.py --workdir="${CLFC_WORKDIR:-workdir/demo}" "$@"
