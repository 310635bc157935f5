"""`eagle-pipe eval`: a draft's acceptance length under real speculative decoding, and a lossless check.

In: a Hugging Face target, an exported draft and benchmark questions (read by stages/data). Out: a report
(acceptance length overall, per position, per category and turn; tokens/s) as JSON. `stage.py` is the command;
`questions.py` renders the prompts, `turns.py` is the turn loop, `report.py` the report, whichever engine decodes.
Engines: `hf_engine.py` (eagle-pipe's own decoding in transformers: `speculative.py` is greedy chain speculative
decoding as the serving engines run it, and the target's own greedy decode it must reproduce token for token;
`static_target.py` and `batched.py` its caches; `dflash_decoding.py` a DFlash draft's block drafting) and
`vllm_engine.py` (the draft served in vLLM's speculative decoding, measured by vLLM's counters).
"""
