"""`eagle-pipe regenerate`: on-policy training data, the target answering the data's prompts itself.

In: chat data (read by stages/data) and a target (a local Hugging Face model, run by transformers or vLLM, or an
OpenAI-compatible server). Out: the regenerated conversations in the format of stages/data/regenerated.py, which
dump-teacher reads. `stage.py` is the command (sharding, resumable parts: the sharded job it shares with dump-teacher,
stages/sharded_job.py); `engines.py` the three ways of asking
the target.
"""
