"""eagle-pipe's benchmark suite (bench/README.md is its map). Run each script as a module from the repository root,
`python -m bench.perf.train_step ...`: the package itself is installed editable, and bench-local imports are
absolute (`from bench.peers.shapes import ...`)."""
