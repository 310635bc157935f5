"""Reading chat datasets and turning records into (input_ids, loss_mask) with the tokenizer's chat template.

OWNER: records helper. API (dump_teacher codes against this; keep it):

    @dataclass
    class Example:
        sample_index: int          # global index of the record over all sources, in order
        input_ids: list[int]
        loss_mask: list[int]       # 1 = supervised token
        truncated: bool

    @dataclass
    class Skipped:
        sample_index: int
        reason: str                # e.g. "malformed_json", "unknown_role", "empty_content", "missing_field",
                                   # "bad_encoding", "no_supervised_tokens", ...
        where: str                 # "file.jsonl:LINE" (or "dataset[idx]")
        message: str

    class BadRecord(Exception)     # raised instead of Skipped under strict=True, message names file:line

    def read_records(sources: list[str]) -> Iterator[tuple[int, str, dict | Exception]]
        # JSONL / JSON / Parquet files, a datasets dir saved with save_to_disk, or a dataset name;
        # yields (sample_index, where, record-or-parse-error) in a deterministic order
    def tokenize_records(sources, tokenizer, *, max_seq_len: int, loss_on="assistant", strict=False,
                         select=None) -> Iterator[Example | Skipped]
        # select: optional callable(sample_index) -> bool, to tokenize only one shard's records
"""
