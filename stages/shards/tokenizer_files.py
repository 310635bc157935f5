"""The tokenizer files of a dump's OUT/target/ and `tokenizer_sha256`, the manifest's hash of them.

dump-teacher records the hash; train refuses to train dumps of different tokenizers together. transformers
also saves how a tokenizer was loaded into tokenizer_config.json (`local_files_only: true` under
HF_HUB_OFFLINE=1), so dump-teacher saves it without those keys (`drop_load_kwargs`) before hashing: the same
tokenizer loaded online or offline gets one hash. A dump made before that keeps them (`load_kwargs_kept`);
verify refuses it in one line saying to re-run dump-teacher.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stages.shards import sha256_file

NON_TOKENIZER_FILES = {"config.json", "weights.safetensors", "generation_config.json"}
# How the tokenizer was loaded, not what it is
LOAD_KWARGS = ("local_files_only", "cache_dir", "force_download", "proxies", "token", "use_auth_token",
               "_commit_hash")


def tokenizer_files(directory: Path) -> list[Path]:
    """Every file of OUT/target/ but the config and the weights."""
    return [f for f in Path(directory).rglob("*") if f.is_file() and f.name not in NON_TOKENIZER_FILES]


def without_load_kwargs(tokenizer_config: bytes) -> bytes:
    """tokenizer_config.json's bytes without the load-time keys (unchanged when it has none)."""
    config = json.loads(tokenizer_config)
    if not any(key in config for key in LOAD_KWARGS):
        return tokenizer_config
    kept = {k: v for k, v in config.items() if k not in LOAD_KWARGS}
    return (json.dumps(kept, indent=2, ensure_ascii=False) + "\n").encode()


def drop_load_kwargs(tokenizer_config: Path) -> None:
    """Rewrite a saved tokenizer_config.json without the load-time keys (if it has any)."""
    if tokenizer_config.is_file():
        raw = tokenizer_config.read_bytes()
        kept = without_load_kwargs(raw)
        if kept != raw:
            tokenizer_config.write_bytes(kept)


def tree_sha256(files: list[Path], root: Path, digest=sha256_file) -> str:
    """One hash of several files: their paths under `root` and their contents' sha256, in path order."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root)}\0{digest(f)}\n".encode())
    return h.hexdigest()


def tokenizer_sha256(directory: Path) -> str:
    """`tokenizer_sha256` of a target/ directory (dump-teacher drops the load-time keys first)."""
    return tree_sha256(tokenizer_files(directory), Path(directory))


def load_kwargs_kept(directory: Path) -> list[str]:
    """The load-time keys a target/ directory's tokenizer_config.json still holds (a dump-teacher before they
    were dropped wrote them); [] for a dump of this version."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return []
    return [key for key in LOAD_KWARGS if key in json.loads(path.read_bytes())]
