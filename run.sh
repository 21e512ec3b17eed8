#!/usr/bin/env bash
# The main job: `./run.sh [train.py flags]` (default: MPPS on MultiFashion).
. "$(dirname "$0")/scripts/setup.sh"
exec .venv/bin/python train.py "$@"
