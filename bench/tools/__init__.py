"""Judges and data tools for users: held-out simulated acceptance of any draft, prompts written by the target."""
