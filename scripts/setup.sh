# Sourced by run.sh and test.sh: makes .venv with the pinned requirements and
# installs Debian's Fashion-MNIST where apt is there. Idempotent and quiet
# when everything is already in place.
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -f .venv/.requirements ] || ! cmp -s requirements.txt .venv/.requirements; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  cp requirements.txt .venv/.requirements
fi
DATA=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -e "$DATA" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO=sudo
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    || echo "setup: could not install dataset-fashion-mnist; pass --data_dir" >&2
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
