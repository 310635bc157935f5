"""NVIDIA Model-Optimizer 0.47 drivers; run in the venv venv.sh makes (they import modelopt, never eagle-pipe)."""
