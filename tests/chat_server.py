"""A loopback OpenAI-compatible chat-completions server for the tests: the tiny target behind the protocol.

Request and response shapes are the ones vLLM's server uses (`GET /v1/models`, `POST /v1/chat/completions`
with `model`, `messages`, `max_tokens`, `temperature`, `chat_template_kwargs`; a `chat.completion` object with
`choices[0].message.content`, `finish_reason` "stop"/"length" and `usage`). The server renders and generates
on its own (plain transformers `generate()` one request at a time), independent of stages/regenerate/engines.py.
`fault(body)` may return "500", "hang" or "malformed" to misbehave for that request.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, target_dir, served_name: str, fault=None, hang_seconds: float = 3.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(target_dir)
        self.model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
        self.served_name, self.root = served_name, str(target_dir)
        self.fault, self.hang_seconds = fault, hang_seconds
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = [eos] if isinstance(eos, int) else list(eos)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, payload: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                if self.path != "/v1/models":
                    return self.reply(404, b'{"error": "not found"}')
                model = {"id": server.served_name, "object": "model", "created": 0, "owned_by": "vllm",
                         "root": server.root, "parent": None, "max_model_len": 1024}
                self.reply(200, json.dumps({"object": "list", "data": [model]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                what = server.fault(body) if server.fault else None
                if what == "500":
                    return self.reply(500, b'{"error": "internal server error"}')
                if what == "hang":
                    time.sleep(server.hang_seconds)
                    return
                if what == "malformed":
                    return self.reply(200, b'{"choices": [{"message": ')
                if body.get("model") != server.served_name:
                    return self.reply(404, json.dumps({"error": f"model {body.get('model')} not served"}).encode())
                self.reply(200, json.dumps(server.complete(body)).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def complete(self, body: dict) -> dict:
        import torch

        assert body["temperature"] == 0.0, "the test server only decodes greedily"
        ids = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, **body.get("chat_template_kwargs", {}))["input_ids"]
        with self.lock, torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=body["max_tokens"], do_sample=False,
                                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        text = self.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": self.served_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                             "logprobs": None, "finish_reason": "stop" if stopped else "length",
                             "stop_reason": None}],
                "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids) + len(new),
                          "completion_tokens": len(new)}}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
