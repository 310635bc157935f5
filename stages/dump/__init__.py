"""Stage one, `eagle-pipe dump-teacher`: the target runs once over the data and writes teacher shards.

In: a Hugging Face target and chat data (read by stages/data). Out: OUT/ in the shard format (stages/shards):
per token the three aux hidden states and the teacher's outputs, plus OUT/target (embedding, lm_head, norm).
`stage.py` is the command and its steps; `plan.py` decides which records go into which part and batch;
`forward.py` runs the target (aux states by hooks, chunked teacher outputs); `writer.py` overlaps the forward
with device-to-host copies and disk writes.
"""
