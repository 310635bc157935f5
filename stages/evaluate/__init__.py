"""`eagle-pipe eval`: a draft's acceptance length under real speculative decoding, and a lossless check.

In: a Hugging Face target, an exported draft and benchmark questions (read by stages/data). Out: a report
(acceptance length overall, per position, per category and turn; tokens/s) as JSON. `stage.py` is the command
and the report; `speculative.py` is greedy chain speculative decoding as the engines run it, and the target's
own greedy decode it must reproduce token for token.
"""
