"""Training-time test (TTT): K unrolled draft steps over packed rows, exactly imitating how engines draft.

OWNER: eagle-model helper.

Batch contract (produced by stages/train_data.py; all [B, T] unless noted; rows are packed documents):
  aux_hidden_states  float [B, T, 3*Ht]  f_t, target features at position t (ascending layer order)
  input_ids          int64 [B, T]        x_{t+1}: the token fed at position t (the next token of the document)
  position_ids       int64 [B, T]        t within its document (RoPE position), restarting at 0 per document
  document_ids       int64 [B, T]        document of each position; unique within a row; padding = its own id
  loss_mask          bool  [B, T]        position t is supervised: x_{t+2} is a trained token, teacher exists
  one teacher, the target's distribution over x_{t+2} (= stored teacher of position t+1):
    teacher_topk_ids int64 [B, T, k] + teacher_topk_logprobs float [B, T, k]   (kind "topk")
    teacher_argmax   int64 [B, T]                                              (kind "argmax")
    teacher_probs    float [B, T, V]                                           (kind "softmax")
A document of n stored tokens gives n-1 positions (t = 0..n-2).

Step j at position t is the engine's draft step j with n = t - j verified tokens (see the reference):
step 0 input (fuse(f_t), x_{t+1}); step j>=1 input (out^{j-1}_{t-1}, x_{t+1}); queries at step j attend to
step-0 keys at positions <= t-j of the same document and to step-i keys (1 <= i <= j) at position t-j+i.
Valid (counted in the loss) only where loss_mask[t] and position_ids[t] >= j.
Nothing of size T*T*K is materialised: a dense [T, T] block for step-0 keys plus j diagonals (CPU path, which
runs backward) or a FlexAttention block mask (GPU path).

API:
    def ttt_forward(model, batch, steps: int, attention="auto") -> list[Tensor]   # logits [B, T, Vd] per step
    def ttt_loss(model, batch, steps: int, normalizer: Tensor, teacher_kind: str, decay: float = 0.8,
                 attention="auto") -> tuple[Tensor, dict[str, Tensor]]
        # normalizer float [steps]: number of valid positions per step (global over ranks / accumulation)
        # loss = sum_j decay**j * ce_sum_j / normalizer_j
        # metrics (all tensors on device, no host sync): "ce_sum" [steps], "correct" [steps], "valid" [steps]
"""
