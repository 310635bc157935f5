"""stages: the pipeline stages (dump-teacher, train, export, eval, run) and the click CLI."""
