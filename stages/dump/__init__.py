"""Stage one, `eagle-pipe dump-teacher`: the target runs once over the data and writes teacher shards.

In: a Hugging Face target and chat data (read by stages/data). Out: OUT/ in the shard format (stages/shards):
per token the three aux hidden states and the teacher's outputs, plus OUT/target (embedding, lm_head, norm).
`stage.py` is the command and its steps (the manifest claim, part reuse and summary are the sharded job's it
shares with regenerate: stages/sharded_job.py); `plan.py` decides which records go into which part and batch;
`engines.py` runs the target, in transformers (`--engine hf`) or vLLM's offline LLM (`--engine vllm`, with the
connector in `vllm_connector.py`), and returns aux and final states; `forward.py` holds the HF forward (aux states
by hooks) and the chunked teacher outputs both engines share; `writer.py` overlaps the forward with
device-to-host copies and disk writes.
"""
