#!/usr/bin/env bash
# Create a separate virtual environment with vLLM speculators 0.9.0 for bench/peers/speculators/step.py.
#
# speculators 0.9.0 needs neither vllm nor a CUDA torch: its EAGLE-3 model and training step are plain torch +
# transformers (<= 5.19), and its fused Triton losses are optional (the eager ones run on CPU). Its wheel also
# requires torchvision and torchaudio, which no speculators module imports (the PyPI torchvision that matches
# torch 2.13 is a CUDA build), so speculators goes in with --no-deps and every other declared requirement is
# installed explicitly. torch is installed first and pinned again in every later pip call, so nothing can swap
# the installed build (pip prefers a 2.13.0+cpu wheel where its indexes or find-links hold one).
#
# Usage: bash bench/peers/speculators/venv.sh [DIR]     (DIR defaults to .venv-speculators; needs python3 >= 3.11)
#        DIR/bin/python -m bench.peers.speculators.step --help
set -euo pipefail

venv_dir="${1:-.venv-speculators}"
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
"${pip[@]}" --no-deps "speculators==0.9.0" "hs-connectors==0.9.0"
# speculators 0.9.0's Requires-Dist, less torchvision, torchaudio (never imported) and hs-connectors (above).
"${pip[@]}" "$torch_pin" "transformers>=5.0,<=5.19.0" "datasets>=4.0.0,<=5.1.0" "numpy>=2.0.0,<=2.5.4" \
    "loguru>=0.7.2,<=0.7.3" "tqdm>=4.66.3,<=4.70.1" "pydantic>=2.0.0" "pydantic-settings>=2.0.0" "openai>=2.0.0" \
    "typer>=0.12.0" aiohttp click httpx huggingface-hub protobuf psutil rich safetensors

"$venv_dir/bin/python" - <<'PY'
import torch, transformers, speculators
from speculators.models.eagle3 import Eagle3DraftModel  # the model bench/peers/speculators/step.py trains
from speculators.train.optimizers import build_optimizers  # and the trainer's optimizer factory
from speculators.version import version
print(f"speculators {version}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
PY
