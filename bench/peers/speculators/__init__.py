"""vLLM speculators 0.9 drivers; run in the venv venv.sh makes (they import speculators, never eagle-pipe)."""
