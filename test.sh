#!/usr/bin/env bash
# The test suite: `./test.sh [pytest args]`.
. "$(dirname "$0")/scripts/setup.sh"
exec .venv/bin/python -m pytest "$@"
