"""What the bench scripts share: running a command (`eagle-pipe`, a peer's driver) as a subprocess under the
heavy-job lock, timing wall and CPU seconds, and writing a result as a dated JSON file under bench/results/.

Standard library only: the peers' drivers import it from their own venvs.

    run_json(cmd, log, lock=None, env=None) -> (exit code, the last JSON object printed, or None)
    eagle_pipe(*args, log, lock=None, env=None) -> dict      # `python -m stages.cli ARGS`; exits on failure
    Stopwatch()                                              # with-block: .wall and .cpu seconds
    median_gap(stamps); print_step_timing(result, as_json)   # the peers' step and train timings
    add_save_flag(parser, name); save_result(name, result)   # --save: bench/results/DATE-NAME.json

The lock is a file taken with `flock` (util-linux) around the whole command, so two heavy jobs on one machine
never overlap and their timings stay honest (`--lock /tmp/eagle-heavy.lock` in the scripts that take one).
`EAGLE_PIPE_BENCH_RESULTS` moves the results folder.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def results_dir() -> Path:
    return Path(os.environ.get("EAGLE_PIPE_BENCH_RESULTS") or REPO / "bench" / "results")


def locked(cmd: list[str], lock: str | None) -> list[str]:
    """`cmd` run under `flock LOCK` when a lock file is given."""
    return ["flock", str(lock), *cmd] if lock else list(cmd)


def offline_env(threads: int = 0) -> dict:
    """This environment with the Hugging Face hub off (the bench never downloads), and `threads` OpenMP threads."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def last_json(stdout: str) -> dict | None:
    """The last line of `stdout` that parses as a JSON object (the scripts print their result last)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def log_line(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_json(cmd: list[str], log: Path, *, lock: str | None = None, env: dict | None = None
             ) -> tuple[int, dict | None]:
    """Run `cmd` from the repository root (under `flock LOCK` when given), its stderr to `log`; returns the exit
    code and the last JSON object it printed (None if none)."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = locked([str(c) for c in cmd], lock)
    log_line(f"{' '.join(cmd)} (log {log})")
    with open(log, "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                              env=env if env is not None else offline_env())
    result = last_json(done.stdout)
    if done.returncode and result is None:
        log_line(f"exit {done.returncode}; last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return done.returncode, result


def eagle_pipe(*args, log: Path, lock: str | None = None, env: dict | None = None) -> dict:
    """`python -m stages.cli ARGS` (this checkout's eagle-pipe) as a subprocess; its JSON summary. A failure
    ends the bench with one line naming the command and the log."""
    rc, result = run_json([sys.executable, "-m", "stages.cli", *map(str, args)], log, lock=lock, env=env)
    if rc or result is None:
        raise SystemExit(f"eagle-pipe {' '.join(map(str, args[:1]))} failed (exit {rc}); see {log}")
    return result


class Stopwatch:
    """Wall and process CPU seconds (all threads) of a with-block: on a shared machine the CPU time tracks the
    work done where the wall time also tracks the neighbours' load."""

    def __enter__(self) -> "Stopwatch":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def median_gap(stamps: list[float]) -> float | None:
    """The median time between consecutive timestamps (step end to step end, so the first step's compile and
    set-up stay out), in seconds to 0.1 ms; None under two stamps."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return round(statistics.median(gaps), 4) if gaps else None


def print_step_timing(result: dict, as_json: bool) -> None:
    """A step benchmark's result (impl, compiled, step_ms, median_ms, tokens_per_s, first_step_ms): one JSON line,
    or a readable line and then the JSON line."""
    if not as_json:
        print(f"{result['impl']} {'compiled' if result['compiled'] else 'eager'}: "
              f"{result['median_ms']:.1f} ms/step median over {len(result['step_ms'])} steps, "
              f"{result['tokens_per_s']:.0f} tokens/s (first step {result['first_step_ms']:.0f} ms)")
    print(json.dumps(result))


def add_save_flag(parser, name: str) -> None:
    parser.add_argument("--save", nargs="?", const=name, default=None, metavar="NAME",
                        help=f"also write the result to bench/results/DATE-NAME.json (NAME default: {name})")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    except OSError:
        return None


def save_result(name: str, result: dict, argv: list[str] | None = None) -> Path:
    """Write `result` as bench/results/YYYY-MM-DD-NAME.json (UTC date; -2, -3 ... when taken), with the command,
    the commit (and whether eagle/, stages/ or bench/ had uncommitted changes) and the machine it was measured
    on. Returns the path."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    stem = f"{now:%Y-%m-%d}-{name}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    record = {"name": name, "measured_at": now.isoformat(timespec="seconds"),
              "command": ["python", "-m", sys.modules["__main__"].__spec__.name
                          if getattr(sys.modules["__main__"], "__spec__", None) else sys.argv[0],
                          *(sys.argv[1:] if argv is None else argv)],
              "commit": _git("rev-parse", "HEAD"),
              "code_changed_since_commit": _git("status", "--porcelain", "--", "eagle", "stages", "bench")
              not in ("", None),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
              "result": result}
    path.write_text(json.dumps(record, indent=1) + "\n")
    log_line(f"wrote {path}")
    return path
