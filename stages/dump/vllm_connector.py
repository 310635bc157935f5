"""The KV connector vLLM loads (by module path) to hand dump-teacher the hidden states it captured.

vLLM's `extract_hidden_states` speculative method stores, for every prompt token, the hidden states of the
requested layers in a KV-cache-like buffer; a KV connector copies them out when the request finishes. vLLM's
reference `ExampleHiddenStatesConnector` copies on a CUDA stream into pinned memory and writes from a thread pool,
which fails on CPU (pinned memory needs an accelerator) and lets the client see a request finish before its file
exists. `SyncHiddenStatesConnector` keeps everything else of it (scheduler side, block bookkeeping, TP rank 0
only) and replaces the copy: gather the request's slots on the device, copy to host synchronously, write
`{hidden_states [T, n_layers, H], token_ids [T]}` with safetensors to a temporary name and rename it into place.
One code path on CPU and CUDA. The client (stages/dump/engines.py) waits for the file, reads it and deletes it.

Loaded by vLLM in its worker processes through `kv_transfer_config.kv_connector_module_path`; nothing else in
eagle-pipe imports it (it imports vllm at module level).
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

CONNECTOR_NAME = "SyncHiddenStatesConnector"


class _Finished:
    """Stands in for the reference's CUDA copy event: the copy is already complete when it is recorded."""

    @staticmethod
    def query() -> bool:
        return True


class SyncHiddenStatesConnector(ExampleHiddenStatesConnector):
    """ExampleHiddenStatesConnector with a synchronous device-to-host copy and an atomic file write."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        device = self._kv_cache.device
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long, device=device)
        offsets = torch.arange(self._block_size, dtype=torch.long, device=device)
        slots = (block_ids[:, None] * self._block_size + offsets[None, :]).flatten()
        num_tokens = pending.token_ids.shape[0]
        states = extract_from_kv_cache(self._kv_cache, slots, num_tokens).to("cpu").contiguous()
        directory = os.path.dirname(pending.filename)
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{os.path.basename(pending.filename)}.tmp-{os.getpid()}")
        save_file({"hidden_states": states, "token_ids": pending.token_ids.clone().contiguous()}, temp)
        os.replace(temp, pending.filename)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is not None:  # only when use_synchronization_lock is on; the client polls for the file instead
            os.close(lock_fd)
        self._req_copy_events[pending.req_id] = _Finished()
