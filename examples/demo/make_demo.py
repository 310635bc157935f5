"""Make the built-in demo: a small chat Llama trained on Python's own docs, and conversations it wrote.

What it makes (all under `examples/demo/`, all committed):

- `target/`: the demo *target model* — a byte-level BPE tokenizer (vocab 2048, ChatML-style chat template,
  eos `<|im_end|>`) trained offline with `tokenizers`, and an 8-layer Llama (hidden 128, 2.49M parameters,
  float32) trained for a few minutes on CPU to answer chat prompts about Python with passages of the Python
  reference. Saved with `save_pretrained`, so `AutoModelForCausalLM` / `AutoTokenizer` load it offline.
- `data/train.jsonl`, `data/eval.jsonl`: OpenAI-style `{"messages": [...]}` records whose assistant turn is the
  target's own greedy continuation (self-distillation — EAGLE drafts should learn what the target actually
  says). Eval prompts are held out: they use prompt phrasings that never occur in train.jsonl (about sections that
  train.jsonl also covers: new prompts, same domain). `--eval-split sections` also holds out whole sections;
  the draft then meets text it has never seen, and acceptance drops (see examples/demo/README.md).

The text is `pydoc_data.topics` (the `help()` pages that ship with CPython), split into its 165 headed
sections. The LM learns the opening (~320 characters) of every section, from two kinds of conversation with a
phrasing drawn at random each time:
  * title questions  — user: 'Explain the "if" statement in Python.'  assistant: the heading, then the
                       section's opening (the heading, copied from the prompt, cues the memorised text);
  * continuations    — user: 'Continue this passage ...: "<eight words of a sentence>"'  assistant: the rest.
So it is a small, low-entropy "expert" that answers with (mostly) the reference's own words, which is what a
few CPU minutes can teach a 2.5M-parameter model; its greedy answers are coherent and on topic.

Reproduce (about 15 minutes on a busy 2-core machine with one torch thread, which beats two there; results
are deterministic up to floating-point reduction order, and the text depends on the Python version's
pydoc_data — this was made with CPython 3.11.7):

    python examples/demo/make_demo.py                 # tokenizer + LM + data
    python examples/demo/make_demo.py --data-only     # regenerate data/ from the committed target/

Everything is offline; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM_PROMPT = "You are a helpful assistant that explains Python."

# Prompt phrasings. The LM is trained on all of them; train.jsonl uses only TRAIN_*, eval.jsonl only EVAL_*.
TRAIN_TITLE_PHRASINGS = [
    "Explain {t} in Python.",
    "Tell me about {t}.",
    "Describe {t}.",
    "What does the Python reference say about {t}?",
    "Give me an overview of {t}.",
    "I am learning Python. Can you explain {t}?",
    "Write a short explanation of {t}.",
]
EVAL_TITLE_PHRASINGS = [
    "Could you summarize {t} for me?",
    "Help me understand {t}.",
    "What should I know about {t}?",
]
TRAIN_CONTINUE_PHRASINGS = [
    'Continue this passage from the Python documentation: "{s}"',
    'Complete the following text: "{s}"',
    'Finish this paragraph: "{s}"',
]
EVAL_CONTINUE_PHRASINGS = [
    'Keep writing after this excerpt: "{s}"',
    'What comes next in the docs after "{s}"?',
]

ANSWER_CHARS = 320   # what the LM learns per section: its opening, cut at a line end (~90 tokens)
MAX_LM_TOKENS = 192  # LM training conversations are truncated to this many tokens
HEADING_UNDERLINE = re.compile(r"([*=\-~^])\1{2,}")


# ----------------------------------------------------------------------------------------------- the text

def doc_sections() -> list[tuple[str, str]]:
    """(title, text) for every headed section of pydoc_data.topics, de-duplicated by title, in a fixed order."""
    from pydoc_data.topics import topics

    sections: dict[str, str] = {}
    for key in sorted(topics):
        lines = topics[key].split("\n")
        title, body = key, []

        def flush():
            text = "\n".join(body).strip("\n")
            if len(text) >= 120 and title not in sections:
                sections[title] = text

        for i, line in enumerate(lines):
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if line.strip() and HEADING_UNDERLINE.fullmatch(nxt) and abs(len(nxt) - len(line.strip())) <= 2:
                flush()
                title, body = line.strip(), []
            elif not HEADING_UNDERLINE.fullmatch(line.strip()):
                body.append(line.rstrip())
        flush()
    return list(sections.items())


def readable_title(title: str) -> str:
    """'The "if" statement' -> 'the "if" statement', so it reads inside a sentence."""
    return title[0].lower() + title[1:] if title.startswith(("The ", "A ", "An ")) else title


def cut(text: str, limit: int = ANSWER_CHARS) -> str:
    """The start of `text`, at most `limit` characters, cut at the last line end before the limit."""
    if len(text) <= limit:
        return text.strip()
    head = text[:limit]
    return head[: head.rfind("\n")].strip() if "\n" in head else head.strip()


def titled(title: str, answer: str) -> str:
    """A title question's answer: the section heading, then its opening (the heading cues the memorised text)."""
    return f"{title}\n\n{answer}"


def sentence_starts(answer: str, min_rest: int = 80) -> list[int]:
    """Offsets in `answer` (after its first sentence) where a sentence starts and enough text follows."""
    starts = [m.end() for m in re.finditer(r"(?<=[.:])\s+(?=[A-Z\"(*])", answer)]
    return [i for i in starts if len(answer) - i >= min_rest and len(answer[i:].split()) >= 16]


def continuation(answer: str, start: int, n_words: int = 8) -> tuple[str, str]:
    """(first words on one line, the rest as written) of `answer[start:]`."""
    head = re.match(r"\s*(?:\S+\s+){%d}" % n_words, answer[start:])
    return " ".join(head.group().split()), answer[start + head.end():]


# ----------------------------------------------------------------------------------------------- the LM

def train_tokenizer(sections, vocab_size: int):
    """A byte-level BPE trained on the docs text, wrapped as a PreTrainedTokenizerFast with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    prompts = TRAIN_TITLE_PHRASINGS + EVAL_TITLE_PHRASINGS + TRAIN_CONTINUE_PHRASINGS + EVAL_CONTINUE_PHRASINGS
    corpus = [text for _, text in sections] + [title for title, _ in sections] + prompts + [SYSTEM_PROMPT]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def lm_conversations(sections, rng: random.Random) -> list[list[dict]]:
    """One epoch of LM training conversations, each with a freshly drawn phrasing (and system prompt or not)."""
    title_phrasings = TRAIN_TITLE_PHRASINGS + EVAL_TITLE_PHRASINGS
    continue_phrasings = TRAIN_CONTINUE_PHRASINGS + EVAL_CONTINUE_PHRASINGS
    convs = []
    for title, text in sections:
        answer = cut(text)
        user = rng.choice(title_phrasings).format(t=readable_title(title))
        convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": titled(title, answer)}])
        if starts := sentence_starts(answer):
            words, rest = continuation(answer, rng.choice(starts))
            user = rng.choice(continue_phrasings).format(s=words)
            convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": rest}])
    for conv in convs:
        if rng.random() < 0.3:
            conv.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    rng.shuffle(convs)
    return convs


def encode_batch(tok, convs) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids (B, T) and labels (B, T) with padding set to -100."""
    seqs = [tok.apply_chat_template(c, tokenize=True)["input_ids"][:MAX_LM_TOKENS] for c in convs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels


def build_model(tok, args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def train_lm(model, tok, sections, args) -> float:
    """AdamW with warmup and cosine decay for a fixed number of steps; returns the final smoothed loss."""
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    queue: list = []
    smooth, t0 = None, time.time()
    model.train()
    for step in range(args.steps):
        if len(queue) < args.batch:
            queue += lm_conversations(sections, rng)
        batch, queue = queue[: args.batch], queue[args.batch:]
        ids, labels = encode_batch(tok, batch)
        lr_scale = (step + 1) / warmup if step < warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_scale
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:5d}/{args.steps}  loss {loss.item():.3f}  smoothed {smooth:.3f}  "
                  f"lr {args.lr * lr_scale:.2e}  {time.time() - t0:6.0f}s", flush=True)
    model.eval()
    return smooth


# ----------------------------------------------------------------------------------------------- the data

def demo_prompts(sections, args) -> tuple[list[list[dict]], list[list[dict]]]:
    """Train and eval prompt conversations (no assistant turn yet). Eval sections and phrasings are held out."""
    rng = random.Random(args.seed + 1)
    order = list(range(len(sections)))
    rng.shuffle(order)
    # "prompts" (default): eval prompts use phrasings train.jsonl never uses, about sections it also covers —
    # the usual held-out split (new prompts, same domain). "sections": eval sections are held out as well.
    held_out = set(order[: args.eval_sections]) if args.eval_split == "sections" else set()
    eval_pool = sorted(held_out) if held_out else sorted(order[: args.eval_records])

    def prompts_for(indices, title_phrasings, continue_phrasings, per_section):
        out = []
        for i in indices:
            title, text = sections[i]
            titles = rng.sample(title_phrasings, k=min(per_section, len(title_phrasings)))
            out += [p.format(t=readable_title(title)) for p in titles]
            starts = sentence_starts(cut(text))
            for start in rng.sample(starts, k=min(per_section, len(starts))):
                out.append(rng.choice(continue_phrasings).format(s=continuation(cut(text), start)[0]))
        return out

    train = prompts_for(sorted(set(order) - held_out), TRAIN_TITLE_PHRASINGS, TRAIN_CONTINUE_PHRASINGS, 3)
    evals = prompts_for(eval_pool, EVAL_TITLE_PHRASINGS, EVAL_CONTINUE_PHRASINGS, 1)
    train = sorted(set(train))
    rng.shuffle(train)
    rng.shuffle(evals)
    train, evals = train[: args.train_records], evals[: args.eval_records]

    def conv(user):
        msgs = [{"role": "user", "content": user}]
        return ([{"role": "system", "content": SYSTEM_PROMPT}] + msgs) if rng.random() < 0.3 else msgs

    return [conv(u) for u in train], [conv(u) for u in evals]


@torch.no_grad()
def greedy_answers(model, tok, prompts, max_new_tokens: int, batch: int = 32) -> list[tuple[str, int]]:
    """(text, n_tokens) of the target's greedy continuation of each prompt, stopped at eos (eos not included).

    Prompts are batched only with prompts of the same token length, so no padding enters the computation and
    each answer is what an unbatched `generate()` gives.
    """
    ids = [tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(ids):
        by_length.setdefault(len(seq), []).append(i)
    out: list = [None] * len(prompts)
    done = 0
    for length in sorted(by_length):
        group = by_length[length]
        for b in range(0, len(group), batch):
            rows = group[b: b + batch]
            x = torch.tensor([ids[i] for i in rows])
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for i, row in zip(rows, gen[:, length:].tolist()):
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id)]
                out[i] = (tok.decode(row), len(row))
            done += len(rows)
        print(f"generated {done}/{len(prompts)}", flush=True)
    return out


def write_jsonl(path: Path, prompts, answers) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for msgs, (text, _) in zip(prompts, answers):
            f.write(json.dumps({"messages": msgs + [{"role": "assistant", "content": text}]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--data-only", action="store_true", help="reuse OUT/target, regenerate OUT/data only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-records", type=int, default=800)
    ap.add_argument("--eval-records", type=int, default=32)
    ap.add_argument("--eval-split", choices=["prompts", "sections"], default="prompts",
                    help="hold out prompt phrasings only (default), or whole documentation sections too")
    ap.add_argument("--eval-sections", type=int, default=20, help="with --eval-split sections: sections held out")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(args.threads)
    t0 = time.time()
    sections = doc_sections()
    target = args.out / "target"
    if args.data_only:
        tok = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    else:
        tok = train_tokenizer(sections, args.vocab_size)
        model = build_model(tok, args)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{len(sections)} sections, vocab {len(tok)}, {n_params / 1e6:.2f}M parameters", flush=True)
        final_loss = train_lm(model, tok, sections, args)
        model.generation_config = GenerationConfig(
            do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=128)
        model.save_pretrained(target)
        tok.save_pretrained(target)
        print(f"final smoothed LM loss {final_loss:.3f}; saved {target} after {time.time() - t0:.0f}s", flush=True)

    train_prompts, eval_prompts = demo_prompts(sections, args)
    for name, prompts in (("train", train_prompts), ("eval", eval_prompts)):
        answers = greedy_answers(model, tok, prompts, args.max_new_tokens)
        write_jsonl(args.out / "data" / f"{name}.jsonl", prompts, answers)
        n_tok = [n for _, n in answers]
        print(f"{name}.jsonl: {len(prompts)} records, {sum(n_tok) / len(n_tok):.1f} generated tokens on average",
              flush=True)
    print(f"sample: {eval_prompts[0][-1]['content']!r}\n  -> {answers[0][0]!r}")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
