"""Draft vocabulary map from supervised-token frequencies.

OWNER: eagle-config helper. API:

    def build_vocab_map(token_counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]
        # token_counts int64 [V] (summed over shards' done.json frequencies)
        # -> d2t int64 [Vd] (target_id = draft_id + d2t[draft_id]), t2d bool [V]
        # Keeps the Vd most frequent ids, ties broken by lower id; draft ids ordered by target id (ascending).
        # Vd >= V -> full vocab (d2t all zeros).
    def target_to_draft_index(t2d: Tensor) -> Tensor   # int64 [V], draft id or -1
"""
