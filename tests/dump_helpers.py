"""Helpers shared by the dump-teacher and verify tests: chat data with varied lengths and a few bad records."""
from __future__ import annotations

import json
import random
from pathlib import Path

BAD_LINES = [
    "this line is not JSON",
    json.dumps({"messages": [{"role": "user", "content": "a question with no answer"}]}),
]


def write_chat_data(path: Path, n: int = 24, seed: int = 0, bad: bool = True) -> Path:
    """`n` OpenAI-style conversations of varied lengths (text from pydoc topics) plus, if `bad`, one malformed
    line and one conversation without an assistant turn (both must be skipped and counted)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = topics[keys[(i * 7) % len(keys)]]
        u, a = rng.randint(10, 80), rng.randint(20, 260)
        lines.append(json.dumps({"messages": [{"role": "user", "content": text[:u]},
                                              {"role": "assistant", "content": text[u:u + a]}]}))
    if bad:
        lines.insert(n // 3, BAD_LINES[0])
        lines.insert(2 * n // 3, BAD_LINES[1])
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_args(command: str, target, data, out, **options) -> list[str]:
    """CLI arguments for a stage that reads --target/--data/--out (options as python names -> --flag-names)."""
    args = [command, "--target", str(target), "--data", str(data), "--out", str(out)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def dump_args(target, data, out, **options) -> list[str]:
    """CLI arguments for `eagle-pipe dump-teacher`."""
    return stage_args("dump-teacher", target, data, out, **options)


def one_line_error(result, *fragments) -> str:
    """A click result that failed the way every stage refuses bad input: exit 2, no traceback, exactly one
    `Error:` line, holding each fragment; that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
