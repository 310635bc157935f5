"""stages: the pipeline stages and the `eagle-pipe` CLI, one sub-package per stage.

    regenerate/  data -> the target's own answers          (on-policy data; optional)
    dump/        data + target -> teacher shards            (`dump-teacher`, stage one)
    train/       teacher shards -> draft checkpoints, export (`train`, `export`, stage two)
    evaluate/    target + draft + questions -> report       (`eval`)
Shared by the stages, imported downward only: data/ (reading records, chat masks, benchmark questions, the
regenerate format), shards/ (the teacher-shard format, its aux encoding, `verify`), target.py (a target's
device, dtype and decoder parts), sharding.py (which records a scheduler task owns), paths.py, errors.py.
At the top: cli.py, run.py (chains the stages), config.py. tests/test_layout.py keeps every import pointing down.
"""
