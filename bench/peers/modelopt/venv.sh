#!/usr/bin/env bash
# Create a separate virtual environment with NVIDIA Model-Optimizer 0.47 for bench/peers/modelopt/step.py.
#
# Model-Optimizer 0.47 needs transformers 5.14.x, which conflicts with the project's own environment, so the
# baseline lives in its own venv. torch is installed first and pinned again in every later pip call, so nothing
# can swap the installed build (pip prefers a 2.13.0+cpu wheel where its indexes or find-links hold one).
#
# Usage: bash bench/peers/modelopt/venv.sh [DIR]        (DIR defaults to .venv-modelopt; needs python3 >= 3.10)
#        DIR/bin/python -m bench.peers.modelopt.step --help
set -euo pipefail

venv_dir="${1:-.venv-modelopt}"
python_bin="${PYTHON:-python3}"
torch_pin="torch==2.13.0"

if [[ ! -x "$venv_dir/bin/python" ]]; then
    "$python_bin" -m venv "$venv_dir"
fi
pip=("$venv_dir/bin/python" -m pip install --disable-pip-version-check)

# torch first. Where pip's configured indexes hold no CPU build and you want one, set
# TORCH_EXTRA_INDEX=https://download.pytorch.org/whl/cpu (on a GPU machine keep the default CUDA build).
torch_extra=()
if [[ -n "${TORCH_EXTRA_INDEX:-}" ]]; then torch_extra=(--extra-index-url "$TORCH_EXTRA_INDEX"); fi
"${pip[@]}" "$torch_pin" "${torch_extra[@]}"
# accelerate: transformers.Trainer (the loop of Model-Optimizer's examples/speculative_decoding/main.py, which
# bench/peers/modelopt/train.py drives) refuses to start without it; that example's requirements.txt pins >= 1.12.
"${pip[@]}" "$torch_pin" "nvidia-modelopt==0.47.0" "transformers==5.14.*" "accelerate>=1.12.0" requests

"$venv_dir/bin/python" - <<'PY'
import torch, transformers, modelopt
import modelopt.torch.speculative as mtsp  # the EAGLE-3 entry point bench/peers/modelopt/step.py uses
import accelerate  # transformers.Trainer, for bench/peers/modelopt/train.py
print(f"modelopt {modelopt.__version__}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
PY
