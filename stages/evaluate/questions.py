"""The questions `eagle-pipe eval` asks, as token ids: every engine renders them here, so all see identical prompts.

Questions come from stages/data/prompts.py (a conversation up to its first user turn, or a benchmark question of
one or more turns, in file order); each turn is rendered with the target's chat template and the generation
prompt. A template that rejects a conversation is bad input, named by its record.
"""
from __future__ import annotations

from stages.errors import StageError


def render_prompt(tokenizer, messages: list[dict], where: str) -> list[int]:
    """Token ids of a conversation rendered with the chat template and the generation prompt."""
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    except Exception as e:  # a template that rejects the conversation: bad input, named
        raise StageError(f"{where}: chat template failed: {e}") from None
    return list(ids)


def load_prompts(sources, tokenizer, num_prompts: int | None) -> tuple[list, list]:
    """([Question], [Skipped]): the first `num_prompts` usable questions (stages/data/prompts.py), the skips.

    Turn 1 of every question is rendered here, so a template that rejects one fails before any generation.
    """
    from stages.data.prompts import read_questions

    questions, skips = read_questions(sources, num_prompts)
    for q in questions:
        render_prompt(tokenizer, q.conversation([]), q.where)
    return questions, skips



def require_questions(data, questions, skips) -> None:
    """No usable question at all: one line saying why (the skip counts and the first skipped record)."""
    from stages.data.records import summarize_skips

    if questions:
        return
    skipped = summarize_skips(skips)
    why = ", ".join(f"{reason} {n}" for reason, n in skipped.items()) or "no records"
    first = f"; first: {skips[0].where}: {skips[0].message}" if skips else ""
    raise StageError(f"{', '.join(map(str, data))}: no record with a user turn to use as a prompt "
                     f"(skipped: {why}{first})")


def cache_length_bound(questions, tokenizer, max_new_tokens: int, max_k: int) -> int:
    """Positions the longest turn can reach: the question rendered with every user turn and empty answers, plus
    each earlier answer (at most max_new_tokens, + slack for its re-tokenized text), plus this turn's new
    tokens and one verification's K+1. The static caches are sized from it once, so nothing recompiles."""
    longest = 0
    for q in questions:
        earlier = len(q.user_turns) - 1
        try:
            base = len(render_prompt(tokenizer, q.conversation([""] * earlier), q.where))
        except StageError:  # a template that refuses empty answers: the first turn, and grow later if needed
            base = len(render_prompt(tokenizer, q.conversation([]), q.where))
        longest = max(longest, base + earlier * (max_new_tokens + 16))
    return longest + max_new_tokens + max_k + 1

