"""Reading what users train and evaluate on; shared by regenerate, dump-teacher and eval.

In: data sources (JSONL / .jsonl.gz / JSON / Parquet files, `datasets` directories and hub names, regenerate
outputs) and a tokenizer with its chat template. Out: records (`sources.py`), tokenized examples with loss masks
(`records.py`, whose mask rule is `chat_masks.py`), benchmark questions for eval (`prompts.py`), and the
regenerate output format that the `regenerate` stage writes and every reader here reads (`regenerated.py`).
"""
