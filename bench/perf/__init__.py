"""Stage speed: the training step, the loader, decoding, batched eval, regenerate throughput."""
