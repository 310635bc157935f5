"""Greedy speculative decoding of a Hugging Face target with a DFlash draft, as vLLM 0.32 serves it (method
"dflash"); used by `eagle-pipe eval` for a draft whose config.json names DFlashDraftModel.

One prompt at a time. Verified tokens are x_0..x_L: x_0..x_{L-1} are in the target cache, x_L is the bonus token
the target just chose. Per round (vLLM's DFlashProposer):
  - the draft's context grows by the newly verified positions: their aux states -> hidden_norm(fc(.)) -> every
    layer's keys/values at their own positions (eagle/dflash.py DFlashContext; vLLM's
    precompute_and_store_context_kv);
  - one draft forward over the block [x_L, MASK x K] at positions L..L+K, bidirectional inside the block and over
    the whole context, proposes d_1..d_K (argmax of slots 1..K; a draft-vocabulary draft's ids mapped to target
    ids through d2t, as vLLM's DFlashQwen3ForCausalLM.compute_logits scatters them);
  - the target verifies [x_L, d_1..d_K] in one forward (stages/evaluate/speculative.py `verify_draft`, looked up
    at call time so the lossless test can break it), keeps the agreeing prefix plus its bonus, and its cache is
    cropped to what it verified.
K is the block's: a DFlash draft drafts block_size - 1 tokens, what it was trained for and what vLLM runs
(num_speculative_tokens); with bidirectional attention another K would change every slot's output, so another
--draft-tokens is refused (`dflash_draft_tokens`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from stages.errors import StageError


def is_dflash_draft(draft_dir) -> bool:
    """Whether the exported draft in draft_dir is a DFlash one (config.json architectures DFlashDraftModel)."""
    from eagle.dflash_export import is_dflash_config

    try:
        return is_dflash_config(json.loads((Path(draft_dir) / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def dflash_draft_tokens(draft_dir, draft_tokens) -> list[int]:
    """[block_size - 1]: the K of a DFlash draft (`draft_tokens` None means the default); another K is refused."""
    config = json.loads((Path(draft_dir) / "config.json").read_text())
    k = int(config["block_size"]) - 1
    asked = None if draft_tokens is None else \
        [int(x) for x in (draft_tokens if isinstance(draft_tokens, (list, tuple)) else str(draft_tokens).split(","))]
    if asked not in (None, [k]):
        raise StageError(f"--draft-tokens {','.join(map(str, asked))}: {draft_dir} is a DFlash draft of block "
                         f"{k + 1}, which drafts K = {k} tokens per round (another K changes every slot's output "
                         "under its bidirectional attention); leave --draft-tokens out or pass " + str(k))
    return [k]


def load_dflash_for(target_model, draft_dir: str, device: str):
    """The DFlash export with the target's embedding and lm_head, in float32, checked against the target."""
    from eagle.dflash_export import load_dflash

    embed = target_model.get_input_embeddings().weight.detach()
    head = target_model.get_output_embeddings()
    try:
        draft = load_dflash(draft_dir, embed_weight=embed.float(),
                            lm_head_weight=None if head is None else head.weight.detach().float(), device=device)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"{draft_dir}: cannot load the DFlash draft: {e}") from None
    cfg, tcfg = draft.cfg, target_model.config.get_text_config()
    if cfg.vocab_size != embed.shape[0] or cfg.target_hidden_size != tcfg.hidden_size or \
            cfg.num_target_layers != tcfg.num_hidden_layers:
        raise StageError(f"{draft_dir}: draft was made for another target (vocab {cfg.vocab_size}, hidden "
                         f"{cfg.target_hidden_size}, {cfg.num_target_layers} layers; target has {embed.shape[0]}, "
                         f"{tcfg.hidden_size}, {tcfg.num_hidden_layers})")
    return draft.float().eval()


@torch.inference_mode()
def dflash_speculative_generate(target, draft, prompt_ids: list[int], *, max_new_tokens: int, draft_tokens: int,
                                eos_ids, device="cpu"):
    """Greedy speculative decoding of one prompt with a DFlash draft; same result type as speculative_generate."""
    from eagle.dflash import DFlashContext, draft_block
    from stages.evaluate import speculative
    from stages.evaluate.speculative import SpeculativeResult, _finish, _sync

    verify = speculative.verify_draft  # looked up per call, so a test can replace it
    K = draft.cfg.block_size - 1
    if draft_tokens != K:
        raise StageError(f"a DFlash draft of block {K + 1} drafts K = {K} tokens, not {draft_tokens}")
    eos_ids = set(eos_ids)
    _sync(device)
    start = time.perf_counter()
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = target.new_cache(len(prompt_ids) + max_new_tokens + K + 1)
    logits, feats = target.forward(prompt, cache, logits_to_keep=1)
    seq = list(prompt_ids) + [int(logits[0, -1].argmax())]
    new, done = _finish(seq[len(prompt_ids):], eos_ids, max_new_tokens)
    result = SpeculativeResult(tokens=new)
    P = len(prompt_ids)
    context = DFlashContext(draft)
    while not done:
        L = len(seq) - 1                      # x_L is the bonus; positions < L are verified, features `feats`
        context.extend(feats.float())         # the newly verified positions context.length .. L-1
        proposal_logits = draft_block(draft, context, seq[L])[1:]        # (K, Vd): slots 1..K
        drafted = draft.draft_to_target(proposal_logits.argmax(-1))      # (K,) target ids; one host sync below
        verify_in = torch.cat([torch.tensor([seq[L]], device=device), drafted]).view(1, K + 1)
        proposal = drafted.tolist()
        t_logits, t_feats = target.forward(verify_in, cache)
        accepted, bonus = verify(t_logits[0], proposal)
        result.accepted.append(accepted)
        target.crop(cache, L + 1 + accepted)
        feats = t_feats[:, : accepted + 1]    # positions L .. L+accepted
        seq += proposal[:accepted] + [bonus]
        new, done = _finish(seq[P:], eos_ids, max_new_tokens)
    _sync(device)
    result.tokens = new
    result.seconds = time.perf_counter() - start
    return result
