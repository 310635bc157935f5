"""The engines `eagle-pipe regenerate` asks for the target's answers: one interface, two implementations.

    engine.generate(requests) -> Iterator[(request position, Response)]   in completion order
    engine.describe() -> dict                                              what the manifest records

`HFEngine` runs the target in-process through transformers (batched, length-sorted, left-padded prompts, KV
cache, per-sequence stop at the template's end-of-turn / EOS ids). `VllmEngine` runs it in vLLM's offline engine
on the same rendered prompts with the same stop rule. `OpenAIEngine` sends every request to an
OpenAI-compatible chat-completions server (vLLM, SGLang, TGI) with stdlib HTTP and a thread pool, retrying
timeouts, HTTP errors and malformed responses with backoff. A request that still fails comes back as a
Response with `error` set, so one bad request costs only its record.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterator

from stages.errors import StageError

FINISH_REASONS = ("stop", "length")


@dataclass
class Decoding:
    max_new_tokens: int = 1024
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    chat_template_kwargs: dict = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Request:
    messages: list[dict]
    seed: int                         # used only when sampling: the same record and turn draw the same text


@dataclass
class Response:
    text: str = ""
    finish_reason: str = ""           # "stop" (end of turn / EOS) or "length" (hit max_new_tokens)
    num_tokens: int = 0
    error: str | None = None          # a skip reason ("engine_error", "template_error") when no answer came
    message: str = ""


def request_seed(seed: int, sample_index: int, turn: int) -> int:
    """A 63-bit seed that depends only on (--seed, record, turn), never on batching or order."""
    digest = hashlib.sha256(f"{seed}:{sample_index}:{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def render_requests(render, requests: list[Request]) -> tuple[dict[int, list[int]], list[tuple[int, Response]]]:
    """Each request's prompt ids by position, and a template_error Response for each one the template refuses."""
    prompts, failed = {}, []
    for i, req in enumerate(requests):
        try:
            prompts[i] = render(req.messages)
        except Exception as exc:
            failed.append((i, Response(error="template_error", message=f"chat template failed: {exc}")))
    return prompts, failed


# ------------------------------------------------------------------------------------------------ hf
def stop_token_ids(model, tokenizer, chat_template_kwargs: dict) -> list[int]:
    """EOS ids (generation_config, model config, tokenizer) plus the template's end-of-turn token: the first
    special token the template writes after an assistant turn's content (`<|eot_id|>`, `<|im_end|>`)."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    marker = "\u2063MARK\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}],
                                             tokenize=False, **chat_template_kwargs)
    except Exception:  # a template that refuses the probe: EOS ids only
        text = ""
    if marker in text:
        special = set(tokenizer.all_special_ids)
        special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        after = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
        ids.update(next(([t] for t in after if t in special), []))
    if not ids:
        raise StageError("the target has no end-of-sequence token and its template no end-of-turn token")
    return sorted(ids)


def plan_generation_batches(lengths: list[int], batch_size: int, batch_tokens: int, max_new_tokens: int
                            ) -> list[list[int]]:
    """Positions grouped into batches over ascending prompt length: at most `batch_size` rows and
    rows * (longest prompt + max_new_tokens) <= batch_tokens (one row at least). Ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1 > batch_size or
                        (len(current) + 1) * (lengths[i] + max_new_tokens) > batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def row_bucket(rows: int, batch_size: int) -> int:
    """Rows of a batch on the static cache: the next power of two, at most batch_size (compiled decode steps are
    keyed by the row count, so a run meets a handful of them, not one per batch size)."""
    return max(rows, min(batch_size, 1 << (rows - 1).bit_length()))


class _PerRowSampler:
    """A logits processor that draws each row's next token with that row's own generator (temperature, top-p)
    and leaves only that token finite, so greedy search emits it: per-record seeds inside a batched generate()."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.generators = None

    def __call__(self, input_ids, scores):
        import torch

        if self.generators is None:  # on the logits' device (with a device_map, the last GPU's)
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p   # keep the smallest prefix reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        picked = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picked)), picked] = 0.0
        return out


class HFEngine:
    """The target through transformers' generate(), batched over length-sorted prompts."""

    kind = "hf"

    def __init__(self, target: str, decoding: Decoding, *, dtype=None, device=None, device_map=None,
                 trust_remote_code=False, batch_size: int = 64, batch_tokens: int = 262144, compile: bool = False):
        from stages.static_cache import supports_static_cache
        from stages.target import dtype_name, load_target, resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer = load_target(target, self.dtype, self.device, trust_remote_code, device_map)
        self.device = self.model.get_input_embeddings().weight.device  # where inputs go (device_map: the first GPU)
        self.decoding, self.batch_size, self.batch_tokens = decoding, batch_size, batch_tokens
        self.stop_ids = stop_token_ids(self.model, self.tokenizer, decoding.chat_template_kwargs)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        self.dtype_name = dtype_name(self.dtype)
        # opt-in: a static KV cache and a compiled decode step (stages/static_cache.py), where transformers
        # supports it. Measured on a 2-core CPU (bench/perf/regenerate.py, SmolLM2-135M, 64 rows) it is
        # slower than the dynamic cache, so the dynamic cache is the default.
        self.static_cache = compile and supports_static_cache(self.model) and not device_map
        self.compile = self.static_cache

    def describe(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype_name, "batch_size": self.batch_size,
                "batch_tokens": self.batch_tokens}

    def render(self, messages: list[dict]) -> list[int]:
        """The prompt the target answers: the chat template with the generation prompt (and --chat-template-kwargs)."""
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, **self.decoding.chat_template_kwargs)
        return list(out["input_ids"])

    def generate(self, requests: list[Request]) -> Iterator[tuple[int, Response]]:
        prompts, failed = render_requests(self.render, requests)
        yield from failed
        positions = sorted(prompts)
        batches = plan_generation_batches([len(prompts[i]) for i in positions], self.batch_size,
                                          self.batch_tokens, self.decoding.max_new_tokens)
        for batch in batches:
            rows = [positions[b] for b in batch]
            yield from zip(rows, self._generate_batch([prompts[r] for r in rows], [requests[r] for r in rows]))

    def _generate_batch(self, prompts: list[list[int]], requests: list[Request]) -> list[Response]:
        import torch

        from stages.static_cache import bucket, static_generation_options

        real_rows = len(prompts)
        width = max(len(p) for p in prompts)
        if self.static_cache:  # rows padded to a power of two (copies of the first prompt, dropped after)
            cap = max(real_rows, min(self.batch_size, self.batch_tokens // (width + self.decoding.max_new_tokens)))
            prompts = prompts + [prompts[0]] * (row_bucket(real_rows, cap) - real_rows)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        kwargs = dict(max_new_tokens=self.decoding.max_new_tokens, do_sample=False, num_beams=1,
                      eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        if self.static_cache:
            kwargs.update(static_generation_options(bucket(width + self.decoding.max_new_tokens), self.compile))
        if not self.decoding.greedy:
            seeds = [req.seed for req in requests] + [0] * (len(prompts) - real_rows)  # padding rows: any seed
            kwargs["logits_processor"] = [_PerRowSampler(seeds, self.decoding.temperature, self.decoding.top_p)]
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        stop = set(self.stop_ids)
        responses = []
        for row in out[:real_rows, width:].tolist():
            end = next((t for t, tok in enumerate(row) if tok in stop), None)
            new = row if end is None else row[:end]
            text = self.tokenizer.decode(new, skip_special_tokens=False)
            responses.append(Response(text=text, finish_reason="length" if end is None else "stop",
                                      num_tokens=len(new) + (end is not None)))
        return responses


# ------------------------------------------------------------------------------------------------ vllm
class VllmEngine:
    """The target in vLLM's offline engine (`vllm.LLM`, in this process's children): each round's prompts in one
    call, batched and scheduled by vLLM.

    The prompts are HFEngine's own (the chat template with the generation prompt, rendered here, passed as token
    ids), and so are the stop rule (`ignore_eos` with stop_token_ids = EOS ids + the template's end-of-turn
    token), the text (the new tokens before the stop token, special tokens kept) and the token count. Greedy
    answers therefore equal HFEngine's wherever the two engines' floats pick the same argmax; sampling draws with
    vLLM's generator seeded per record and turn (reproducible, not HFEngine's draws)."""

    kind = "vllm"

    def __init__(self, target: str, decoding: Decoding, *, dtype=None, device=None, vllm=None,
                 trust_remote_code=False):
        from types import SimpleNamespace

        from stages.target import dtype_name, load_tokenizer, resolve_device, resolve_dtype, target_generation_sources
        from stages.vllm_runtime import VllmOptions, open_llm, require_vllm, vllm_version

        if trust_remote_code:
            raise StageError("--trust-remote-code is for --engine hf; vLLM loads the target with its own model code")
        self.vllm = require_vllm()
        self.dtype_name = dtype_name(resolve_dtype(dtype, resolve_device(device)))
        self.options = VllmOptions(**{**(vllm or VllmOptions()).__dict__, "dtype": self.dtype_name})
        self.tokenizer = load_tokenizer(target)
        generation, config = target_generation_sources(target)
        sources = SimpleNamespace(generation_config=generation, config=config)  # what stop_token_ids reads
        self.decoding = decoding
        self.stop_ids = stop_token_ids(sources, self.tokenizer, decoding.chat_template_kwargs)
        self.version = vllm_version()
        self.llm = open_llm(self.options, str(target))

    def describe(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype_name, "vllm_version": self.version, **self.options.record()}

    render = HFEngine.render

    def generate(self, requests: list[Request]) -> Iterator[tuple[int, Response]]:
        prompts, failed = render_requests(self.render, requests)
        yield from failed
        positions = sorted(prompts)
        if not positions:
            return
        d = self.decoding
        params = [self.vllm.SamplingParams(temperature=d.temperature, top_p=d.top_p, max_tokens=d.max_new_tokens,
                                           seed=None if d.greedy else requests[i].seed, ignore_eos=True,
                                           stop_token_ids=list(self.stop_ids), detokenize=False)
                  for i in positions]
        results = self.llm.generate([{"prompt_token_ids": prompts[i]} for i in positions], params, use_tqdm=False)
        stop = set(self.stop_ids)
        for i, result in zip(positions, results):
            tokens = list(result.outputs[0].token_ids)
            end = next((t for t, tok in enumerate(tokens) if tok in stop), None)
            new = tokens if end is None else tokens[:end]
            yield i, Response(text=self.tokenizer.decode(new, skip_special_tokens=False),
                              finish_reason="length" if end is None else "stop", num_tokens=len(new) + (end is not None))


# ------------------------------------------------------------------------------------------------ openai
class _Malformed(Exception):
    pass


class OpenAIEngine:
    """Chat completions from an OpenAI-compatible server; `concurrency` requests in flight."""

    kind = "openai"

    def __init__(self, target: str, decoding: Decoding, *, base_url: str, served_model: str | None = None,
                 api_key_env: str | None = None, concurrency: int = 16, request_timeout: float = 600.0,
                 max_retries: int = 3, retry_backoff: float = 1.0):
        if not base_url:
            raise StageError("--engine openai needs --base-url (e.g. http://localhost:8000/v1)")
        self.base_url = base_url.rstrip("/")
        self.decoding, self.concurrency = decoding, concurrency
        self.timeout, self.max_retries, self.retry_backoff = request_timeout, max_retries, retry_backoff
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise StageError(f"--api-key-env {api_key_env}: the environment variable is not set")
            self.headers["Authorization"] = f"Bearer {key}"
        self.model = self._check_served_model(served_model or target, None if served_model else target)

    def describe(self) -> dict:
        return {"kind": self.kind, "served_model": self.model}

    def _check_served_model(self, wanted: str, target: str | None) -> str:
        """The served model must be the target: `wanted` among the server's model ids, or (without
        --served-model) the one whose id or root path ends with the target's directory name (vLLM serves a
        path under that path, and reports it as `root` when it is renamed with --served-model-name)."""
        try:
            listing = self._call("GET", "/models", None)
            served = [(m["id"], m.get("root") or "") for m in listing["data"]]
        except Exception as exc:
            raise StageError(f"--base-url {self.base_url}: cannot list the served models ({_describe(exc)})") from None
        ids = [i for i, _ in served]
        if wanted in ids:
            return wanted
        name = os.path.basename(str(target or "").rstrip("/"))
        matches = [i for i, root in served if name and name in (os.path.basename(i.rstrip("/")),
                                                                  os.path.basename(root.rstrip("/")))]
        if len(matches) == 1:
            return matches[0]
        raise StageError(f"--base-url {self.base_url} serves {ids}, not the target {wanted!r}; "
                         "pass --served-model NAME if the server names the target differently")

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Malformed(f"response is not JSON ({exc})") from None

    def request_body(self, req: Request) -> dict:
        body = {"model": self.model, "messages": req.messages, "max_tokens": self.decoding.max_new_tokens,
                "temperature": self.decoding.temperature, "top_p": self.decoding.top_p, "n": 1, "stream": False}
        if not self.decoding.greedy:
            body["seed"] = req.seed
        if self.decoding.chat_template_kwargs:
            body["chat_template_kwargs"] = self.decoding.chat_template_kwargs
        return body

    def _complete(self, req: Request) -> Response:
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            try:
                return parse_completion(self._call("POST", "/chat/completions", self.request_body(req)))
            except Exception as exc:  # timeouts, connection and HTTP errors, malformed bodies: retried
                last = _describe(exc)
        return Response(error="engine_error", message=f"{self.max_retries + 1} attempts failed; last: {last}")

    def generate(self, requests: list[Request]) -> Iterator[tuple[int, Response]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._complete, req): i for i, req in enumerate(requests)}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()


def parse_completion(body) -> Response:
    """A chat.completion object -> Response; raises _Malformed on anything that is not one. A reasoning
    parser's separate `reasoning_content` is put back in front of the answer as <think>...</think>."""
    try:
        choice = body["choices"][0]
        message, finish = choice["message"], choice["finish_reason"]
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        tokens = body["usage"]["completion_tokens"]
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _Malformed(f"not a chat completion (missing {exc})") from None
    if not isinstance(content, str) or (reasoning is not None and not isinstance(reasoning, str)):
        raise _Malformed("message content is not a string")
    if finish not in FINISH_REASONS or not isinstance(tokens, int):
        raise _Malformed(f"finish_reason {finish!r} / completion_tokens {tokens!r}")
    if reasoning:
        content = f"<think>\n{reasoning}\n</think>\n\n{content}"
    return Response(text=content, finish_reason=finish, num_tokens=tokens)


def _describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def make_engine(engine: str, target: str, decoding: Decoding, **options):
    if engine == "hf":
        keys = ("dtype", "device", "device_map", "trust_remote_code", "batch_size", "batch_tokens", "compile")
        return HFEngine(target, decoding, **{k: options[k] for k in keys if k in options})
    if engine == "vllm":
        keys = ("dtype", "device", "vllm", "trust_remote_code")
        return VllmEngine(target, decoding, **{k: options[k] for k in keys if k in options})
    if engine == "openai":
        keys = ("base_url", "served_model", "api_key_env", "concurrency", "request_timeout", "max_retries",
                "retry_backoff")
        return OpenAIEngine(target, decoding, **{k: options[k] for k in keys if k in options})
    raise StageError(f"--engine {engine!r}: expected hf, vllm or openai")
