"""Draft loss against cached teacher outputs, and on-device accuracy / simulated acceptance metrics.

OWNER: eagle-config helper. API:

    def draft_cross_entropy(logits, batch, valid, target_to_draft, d2t, teacher_kind) -> tuple[Tensor, Tensor, Tensor]
        # logits [B,T,Vd] (any float dtype; computed in float32); valid bool [B,T]
        # topk: teacher top-k log-probs -> probs, keep ids inside the draft vocab, renormalise over kept;
        #       positions with zero kept mass drop out of `valid`.
        # argmax: hard CE on the teacher argmax mapped into the draft vocab (drops out if outside).
        # softmax: full distribution restricted to the draft vocab, renormalised.
        # returns (ce_sum scalar, correct_count scalar, valid_count scalar); "correct" = draft argmax mapped
        # through d2t equals the teacher's argmax (target id), over the valid positions.
    def simulated_acceptance_length(acc: Tensor) -> Tensor
        # acc [K] per-step accuracies -> 1 + sum_k prod_{j<=k} acc_j (tokens per target forward incl. bonus)
"""
