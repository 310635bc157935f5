"""Recipe ablations: plans of arms run through `eagle-pipe run` (recipe.py), the data they need, aux-state studies."""
