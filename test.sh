#!/usr/bin/env bash
# The test suite: `./test.sh [pytest args]`, on two worker processes (the
# machines have 2 cores; TensorFlow keeps about one of them busy per process).
. "$(dirname "$0")/scripts/setup.sh"
export TF_CPP_MIN_LOG_LEVEL=3  # TensorFlow's start-up notices would follow pytest's summary
exec .venv/bin/python -m pytest -n 2 --dist worksteal "$@"
