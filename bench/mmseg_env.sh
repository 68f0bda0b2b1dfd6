#!/usr/bin/env bash
# The reference environment of bench/vs_mmseg.py: mmsegmentation 0.27 on mmcv 1.6 without its compiled ops, beside
# the same torch as mirseg's (pinned by constraints.txt), in a virtual environment of its own. Never mirseg's:
# mirseg does not depend on mmcv or mmseg, and mmcv 1.x needs an old setuptools to build.
#     bash bench/mmseg_env.sh /tmp/mmseg-venv
set -euo pipefail
venv=${1:?usage: bash bench/mmseg_env.sh VENV_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv "$venv"
pip() { "$venv/bin/pip" --disable-pip-version-check -q "$@"; }
pip install -c "$here/constraints.txt" torch numpy opencv-python-headless pyyaml addict "yapf==0.40.1" pillow \
    matplotlib prettytable packaging wheel
# mmcv 1.x builds from its sdist with setup.py, which imports pkg_resources (gone from setuptools >= 81);
# MMCV_WITH_OPS=0 builds the pure-Python "lite" package: no compiler, no CUDA.
pip install "setuptools<70"
MMCV_WITH_OPS=0 pip install --no-build-isolation --no-deps "mmcv==1.6.2"
pip install -c "$here/constraints.txt" "setuptools>=77"  # what torch 2.13 asks for
# mmcls is only needed by mmseg's ConvNeXt backbone, not by the networks compared.
pip install --no-deps "mmsegmentation==0.27.0"
"$venv/bin/python" "$here/bench/mmseg_reference.py" --check
echo "reference ready: python bench/vs_mmseg.py --reference-python $venv/bin/python"
