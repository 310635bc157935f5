"""Stage two, `eagle-pipe train` (and `export`): an EAGLE-3 draft trained from teacher shards, never the target.

In: one or more dumps in the shard format (stages/shards). Out: RUN/ with checkpoints, metrics.jsonl,
train_summary.json and RUN/export/, the serving layout vLLM and SGLang load (eagle/export.py).
`stage.py` is the command and the loop; `settings.py` its options; `drafters.py` the drafters it trains (EAGLE-3 /
3.1, DFlash) behind one interface; `setup.py` what happens before the first step (dump checks, draft, optimizer,
schedule, process group); `loader.py` packs shard tokens into fixed-shape
batches; `checkpoint.py` saves and resumes; `export.py` is `eagle-pipe export` (checkpoint -> serving layout).
"""
