"""The drafters `eagle-pipe train` trains, behind one small interface, so the stage (stages/train/stage.py) runs
one loop with no per-architecture branches (as stages/regenerate/engines.py does for engines).

    drafter = drafter_for(settings)            by --draft-arch: EAGLE-3 / 3.1 (a TTT-unrolled chain draft,
                                               eagle/ttt.py) or DFlash (block drafts, eagle/dflash.py)
    drafter.build(teacher_dir, manifest, token_counts) -> the draft (a module with .cfg), from the dump alone
    drafter.note(cfg) -> str                   what `train` says about the architecture it trains
    drafter.metric_steps                       what the per-position metrics count: TTT steps or block slots
    drafter.anchors() -> AnchorPlan | None     what the loader adds to each batch (DFlash: its anchor blocks)
    drafter.loss(model, batch, normalizer, teacher_kind) -> (loss, metrics)    inside the compiled step
    drafter.fixed_settings(record) -> dict     settings of a recorded run a resume must share, resolved
    drafter.trained_config(draft_config) -> dict   a checkpoint's draft config as this version reads it
    drafter.export(model, out_dir) -> Path     the serving layout
    exporter_for(draft_config) -> (model, export)  `eagle-pipe export`: the empty draft of a checkpoint's config
                                               and the function that writes its layout
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.train.loader import AnchorPlan
from stages.train.settings import TrainSettings

EAGLE3_DRAFT_VOCAB = 32000  # an EAGLE-3 draft's vocabulary when --draft-vocab-size is not given (capped at V)


def ttt_loss(*args, **kwargs):
    """eagle.ttt.ttt_loss, imported late (keeps `eagle-pipe --help` fast); one module-level name tests can wrap."""
    from eagle.ttt import ttt_loss as _ttt_loss

    return _ttt_loss(*args, **kwargs)


# what `train` says on rank 0 about an EAGLE-3 architecture it trains
ARCH_NOTES = {"eagle3": "eagle3",
              "eagle3.1": "eagle3.1 (fc_norm: an RMSNorm per aux hidden state before fc; norm_output: the next "
                          "draft step receives norm(out))"}


@dataclass(frozen=True)
class Eagle3Drafter:
    """EAGLE-3 / 3.1: one layer over fused aux states, trained by a TTT unroll of `ttt_steps` chain steps over a
    draft vocabulary (eagle/ttt.py, eagle/loss.py)."""

    draft_arch: str
    draft_vocab_size: int
    ttt_steps: int
    decay: float
    attention: str
    init_lm_head: bool
    draft_rope: str
    seed: int

    @classmethod
    def from_settings(cls, s: TrainSettings) -> "Eagle3Drafter":
        return cls(s.draft_arch, s.draft_vocab_size or EAGLE3_DRAFT_VOCAB, s.ttt_steps, s.decay, s.attention,
                   s.init_lm_head, s.draft_rope, s.seed)

    @property
    def metric_steps(self) -> int:
        return self.ttt_steps

    def build(self, teacher_dir: Path, manifest: dict, token_counts):
        from stages.train.setup import build_draft

        return build_draft(teacher_dir, manifest, token_counts, draft_vocab_size=self.draft_vocab_size,
                           ttt_steps=self.ttt_steps, init_lm_head=self.init_lm_head, seed=self.seed,
                           draft_rope=self.draft_rope, draft_arch=self.draft_arch)

    def note(self, cfg) -> str:
        return ARCH_NOTES.get(cfg.draft_arch, cfg.draft_arch)

    def anchors(self) -> None:
        return None

    def loss(self, model, batch: dict, normalizer, teacher_kind: str):
        return ttt_loss(model, batch, self.ttt_steps, normalizer, teacher_kind, decay=self.decay,
                        attention=self.attention)

    def fixed_settings(self, record: dict) -> dict:
        """The draft vocabulary asked for, resolved: a run of the default recorded 32000 before it was None."""
        asked = record.get("draft_vocab_size")
        return {"draft_vocab_size": EAGLE3_DRAFT_VOCAB if asked is None else asked}

    def trained_config(self, draft_config: dict) -> dict:
        return draft_config

    def export(self, model, out_dir: Path) -> Path:
        from eagle.export import export_draft

        return export_draft(model, out_dir)


@dataclass(frozen=True)
class DFlashDrafter:
    """DFlash: a few layers drafting a block of `block_size` tokens per forward, trained on anchor blocks drawn by
    the loader (eagle/dflash.py), with slot weights exp(-(k-1)/gamma)."""

    block_size: int
    draft_layers: int
    mask_token_id: int | None
    draft_vocab_size: int | None
    anchors_per_row: int
    gamma: float
    draft_rope: str
    seed: int

    @classmethod
    def from_settings(cls, s: TrainSettings) -> "DFlashDrafter":
        from eagle.dflash import default_gamma

        return cls(s.block_size, s.draft_layers, s.mask_token_id, s.draft_vocab_size,  # None: the full vocabulary
                   s.anchors_per_row or max(1, s.seq_len // s.block_size), s.loss_gamma or default_gamma(s.block_size),
                   s.draft_rope, s.seed)

    @property
    def metric_steps(self) -> int:
        return self.block_size - 1

    def build(self, teacher_dir: Path, manifest: dict, token_counts):
        from stages.train.setup import build_dflash

        return build_dflash(teacher_dir, manifest, token_counts, block_size=self.block_size,
                            draft_layers=self.draft_layers, mask_token_id=self.mask_token_id, seed=self.seed,
                            draft_rope=self.draft_rope, draft_vocab_size=self.draft_vocab_size)

    def note(self, cfg) -> str:
        vocab = f"full vocabulary {cfg.vocab_size}" if cfg.draft_vocab_size is None else \
            f"draft vocabulary {cfg.draft_vocab_size} of {cfg.vocab_size}"
        return (f"dflash ({cfg.num_hidden_layers} layer(s), block {cfg.block_size}: serve with K = "
                f"{cfg.block_size - 1}; mask token {cfg.mask_token_id}; aux layers {list(cfg.aux_layer_ids)}; "
                f"{vocab})")

    def anchors(self) -> AnchorPlan:
        return AnchorPlan(self.block_size, self.anchors_per_row, self.seed)

    def loss(self, model, batch: dict, normalizer, teacher_kind: str):
        from eagle.dflash import dflash_loss

        return dflash_loss(model, batch, normalizer, teacher_kind, self.gamma)

    def fixed_settings(self, record: dict) -> dict:
        """block_size, draft_layers, mask_token_id and the draft vocabulary are in the draft config (compared
        whole); the anchors change the data each step sees."""
        return {"anchors_per_row": record.get("anchors_per_row")}

    def trained_config(self, draft_config: dict) -> dict:
        """DFlash drafts written before the draft vocabulary lack the key: the full one."""
        return {"draft_vocab_size": None} | draft_config

    def export(self, model, out_dir: Path) -> Path:
        from eagle.dflash_export import export_dflash

        return export_dflash(model, out_dir)


DRAFTERS = {"eagle3": Eagle3Drafter.from_settings, "eagle3.1": Eagle3Drafter.from_settings,
            "dflash": DFlashDrafter.from_settings}


def drafter_for(s: TrainSettings):
    """The drafter `--draft-arch` names, built from the settings it reads."""
    return DRAFTERS[s.draft_arch](s)


def _eagle3_exporter(draft_config: dict):
    from eagle.config import DraftConfig
    from eagle.export import export_draft
    from eagle.model import Eagle3Draft

    return Eagle3Draft(DraftConfig.from_dict(draft_config)), export_draft


def _dflash_exporter(draft_config: dict):
    from eagle.dflash import DFlashConfig, DFlashDraft
    from eagle.dflash_export import export_dflash

    return DFlashDraft(DFlashConfig.from_dict(draft_config)), export_dflash


# a checkpoint's draft_config names its architecture; EAGLE-3 configs (eagle3, eagle3.1) share one reader
EXPORTERS = {"dflash": _dflash_exporter}


def exporter_for(draft_config: dict):
    """(the empty draft of a checkpoint's draft config, the function writing its serving layout); raises
    KeyError / TypeError / ValueError on a bad config."""
    arch = draft_config.get("draft_arch") if isinstance(draft_config, dict) else None
    return EXPORTERS.get(arch, _eagle3_exporter)(draft_config)
