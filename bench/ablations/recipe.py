"""Recipe ablations, the one ablation runner: a plan of arms, each a set of overrides of one pipeline.yaml, run
through `eagle-pipe run`; prints one table (JSON, then markdown) of what each arm's draft measures on the judge.

    python -m bench.ablations.recipe bench/ablations/plans/smollm2.yaml --lock /tmp/eagle-heavy.lock  # what is missing
    python -m bench.ablations.recipe bench/ablations/plans/smollm2.yaml --table --save   # the table, and its JSON file
    python -m bench.ablations.recipe bench/ablations/plans/fp8-demo.yaml --arms demo-full,demo-fp8 --dry-run

A plan (YAML, kept in bench/ablations/plans/):

    base: examples/smollm2/pipeline.yaml    # the recipe: sections regenerate / dump-teacher / train / eval
    work: ${RECIPE_WORK:-work/recipe}       # every output of every arm
    defaults:                               # overrides applied to every arm first (e.g. where the data lives)
      dump-teacher: {target: "${SMOLLM2_TARGET}"}
    arms:
      - name: recipe                        # the recipe itself
        factor: recipe
      - name: lr-1e-3
        factor: learning rate 1e-3
        train: {lr: 1.0e-3}
        seeds: [0, 1, 2]                    # one training per seed (train.seed); the table shows the mean
        k: [3, 5]                           # one eval per K (eval.draft_tokens)
    compare:                                # optional: [arm, baseline] pairs, reported as ratios
      - [lr-1e-3, recipe]

`${NAME}` / `${NAME:-default}` in any value comes from `--var NAME=VALUE` or the environment, so a plan names no
machine's paths (a value that is only a variable is read as YAML: `max_steps: ${STEPS:-300}` is a number). An
arm's sections are merged into the base's key by key; a key or a whole section set to null is removed (e.g.
`regenerate: null` trains on the data's original answers). Output directories are named by a hash of
everything that makes their content (a stage's options plus the directories it reads), so arms with the same
regenerate, dump or training share one directory, and `eagle-pipe run`'s own skip logic reuses it instead of
recomputing. An explicit `out` in the plan is kept. Each (arm, seed, K) gets `WORK/arms/NAME/pipeline-sS-kK.yaml`
and, when its run finishes, `WORK/arms/NAME/result-sS-kK.json` (the run's summary plus what the bench adds); a
unit whose result exists is not run again, so the bench resumes where it stopped. With `--lock FILE` every run
is started under `flock FILE` (the team's one-heavy-job rule).

Per arm, the table gives the factor changed, the judge's acceptance length per K (mean over seeds; every seed's
value is kept) and per category at the first K, the eval engine, the acceptance rate per draft position and the
tokens/s with and without the draft (at the first K), lossless (all units), optimizer steps, trained positions
(steps x batch x grad-accum x seq-len, i.e. packed row positions), the training's wall seconds, the eval's wall
seconds, the held-out simulated acceptance length at the end of training, the regenerated / dumped tokens and
the dump's bytes per token (measured, and the shard format's formula). `compare` gives arm / baseline of the
acceptance length per K, the held-out simulated AL and the bytes per token. `--save` writes the JSON to
bench/results/DATE-recipe-PLAN.json.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.common import REPO, add_save_flag, locked, log_line, run_json, save_result

SECTIONS = ("regenerate", "dump-teacher", "train", "export", "eval")
CATEGORY_ORDER = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Unit:
    """One `eagle-pipe run`: an arm at one seed and one K."""
    arm: str
    factor: str
    seed: int | None
    k: int
    sections: dict = field(repr=False)

    @property
    def tag(self) -> str:
        return f"s{'-' if self.seed is None else self.seed}-k{self.k}"


def _norm(section: dict | None) -> dict:
    return {str(k).replace("-", "_"): v for k, v in (section or {}).items()}


def merge(base: dict, overrides: dict) -> dict:
    """Sections of `overrides` merged into `base` key by key; None removes a key or a whole section."""
    out = copy.deepcopy(base)
    for name, values in (overrides or {}).items():
        if name not in SECTIONS:
            raise SystemExit(f"unknown section '{name}' in a plan override (sections: {', '.join(SECTIONS)})")
        if values is None:
            out.pop(name, None)
            continue
        target = out.setdefault(name, {})
        for key, value in _norm(values).items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = copy.deepcopy(value)
    return out


VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute(obj, variables: dict, where: str):
    """`${NAME}` and `${NAME:-default}` in every string of a plan, from `variables` (--var) or the environment, so
    a plan names no machine's paths."""
    if isinstance(obj, dict):
        return {k: substitute(v, variables, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, variables, where) for v in obj]
    if not isinstance(obj, str):
        return obj

    def value(m):
        name, default = m.group(1), m.group(2)
        found = variables.get(name, os.environ.get(name, default))
        if found is None:
            raise SystemExit(f"{where}: ${{{name}}} is not set (export {name}=... or pass --var {name}=...)")
        return found

    text = VARIABLE.sub(value, obj)
    return yaml.safe_load(text) if VARIABLE.fullmatch(obj) and text else text  # `max_steps: ${STEPS:-300}`: 300


def load_plan(path: Path, variables: dict | None = None) -> dict:
    plan = substitute(yaml.safe_load(Path(path).read_text()) or {}, variables or {}, str(path))
    if not isinstance(plan, dict) or not isinstance(plan.get("arms"), list) or not plan["arms"]:
        raise SystemExit(f"{path}: a plan is a mapping with a non-empty list under 'arms'")
    names = [a.get("name") for a in plan["arms"]]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise SystemExit(f"{path}: every arm needs a unique non-empty 'name' (got {names})")
    for pair in plan.get("compare") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and set(pair) <= set(names)):
            raise SystemExit(f"{path}: 'compare' takes pairs of arm names [arm, baseline] (got {pair})")
    return plan


def without_wiring(base: dict) -> dict:
    """The base pipeline without its output paths and the paths wired from them (the bench names every output by
    its inputs; a plan's own `out` is kept)."""
    base = copy.deepcopy(base)
    regen_out = (base.get("regenerate") or {}).pop("out", None)
    dump = base.get("dump-teacher") or {}
    if regen_out is not None and dump.get("data") in ([regen_out], regen_out):
        dump.pop("data")
    dump.pop("out", None)
    for key in ("out", "teacher_dir"):
        (base.get("train") or {}).pop(key, None)
    for key in ("draft", "run_dir"):
        (base.get("eval") or {}).pop(key, None)
    (base.get("export") or {}).pop("out", None)
    return base


def expand(plan: dict, plan_path: Path) -> list[Unit]:
    """Every (arm, seed, K) unit of the plan, with its merged sections (output paths not yet assigned)."""
    base_path = Path(plan.get("base", "pipeline.yaml"))
    base_path = base_path if base_path.is_absolute() else REPO / base_path
    base = without_wiring({name: _norm(values) for name, values in (yaml.safe_load(base_path.read_text()) or {}).items()})
    base = merge(base, plan.get("defaults") or {})
    units = []
    for arm in plan["arms"]:
        overrides = {k: v for k, v in arm.items() if k in SECTIONS}
        unknown = set(arm) - set(SECTIONS) - {"name", "factor", "seeds", "k"}
        if unknown:
            raise SystemExit(f"{plan_path}: arm '{arm['name']}': unknown key(s) {sorted(unknown)}")
        sections = merge(base, overrides)
        seeds = arm.get("seeds") or plan.get("seeds") or [None]
        k_values = arm.get("k") or plan.get("k") or [sections.get("eval", {}).get("draft_tokens", 3)]
        for seed in seeds:
            for k in ([k_values] if isinstance(k_values, int) else k_values):
                unit_sections = merge(sections, {"eval": {"draft_tokens": int(k)}})
                if seed is not None:
                    unit_sections = merge(unit_sections, {"train": {"seed": int(seed)}})
                units.append(Unit(arm["name"], str(arm.get("factor", arm["name"])), seed, int(k), unit_sections))
    return units


# ------------------------------------------------------------------------------------------------ paths
def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def assign_paths(sections: dict, work: Path) -> dict:
    """Output directories named by what makes their content; the inputs each stage reads wired explicitly."""
    wired = copy.deepcopy(sections)
    regen, dump, train = wired.get("regenerate"), wired["dump-teacher"], wired["train"]
    if regen is not None:
        regen.setdefault("target", dump.get("target"))
        regen.setdefault("out", str(work / "regen" / digest({k: v for k, v in regen.items() if k != "out"})))
        dump.setdefault("data", [regen["out"]])
    dump.setdefault("out", str(work / "dump" / digest({k: v for k, v in dump.items() if k != "out"})))
    train["teacher_dir"] = dump["out"]
    train.setdefault("out", str(work / "train" / digest({k: v for k, v in train.items() if k != "out"})))
    return wired


# ------------------------------------------------------------------------------------------------ running
def run_unit(unit: Unit, work: Path, lock: str | None, dry_run: bool) -> dict | None:
    """Write the unit's pipeline.yaml and run it (unless its result exists); returns the result or None."""
    arm_dir = work / "arms" / unit.arm
    result_path = arm_dir / f"result-{unit.tag}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    sections = assign_paths(unit.sections, work)
    pipeline = arm_dir / f"pipeline-{unit.tag}.yaml"
    arm_dir.mkdir(parents=True, exist_ok=True)
    pipeline.write_text(yaml.safe_dump(sections, sort_keys=False))
    cmd = [sys.executable, "-m", "stages.cli", "run", str(pipeline), "--json"]
    if dry_run:
        print(f"would run: {' '.join(locked(cmd, lock))}", file=sys.stderr)
        return None
    log_line(f"{unit.arm} {unit.tag}")
    t0 = time.time()
    rc, summary = run_json(cmd, arm_dir / f"run-{unit.tag}.log", lock=lock)
    if rc != 0 or summary is None:
        return None
    result = {"arm": unit.arm, "factor": unit.factor, "seed": unit.seed, "k": unit.k, "pipeline": str(pipeline),
              "wall_seconds": time.time() - t0, "sections": sections, "summary": summary,
              "regenerated_tokens": regenerated_tokens(sections), "dump": dump_facts(sections),
              "train": train_facts(sections)}
    result_path.write_text(json.dumps(result, indent=1))
    log_line(f"  AL {summary['acceptance_length']:.3f} at K={unit.k}, lossless {summary['lossless']}, "
             f"{time.time() - t0:.0f} s")
    return result


def regenerated_tokens(sections: dict) -> int | None:
    regen = sections.get("regenerate")
    if regen is None:
        return None
    total = 0
    for done in Path(regen["out"]).glob("shard-*/done.json"):
        total += int(json.loads(done.read_text()).get("generated_tokens", 0))
    return total


def formula_bytes_per_token(manifest: dict, tokens: int, sequences: int) -> float:
    """The shard format's size: 3*H*aux bytes (+ 3*4 scales for fp8) + k*(4+4) + 4 (input id) + 1 (loss mask)
    per token, + 16 per sequence (cu_seqlens, sample_index); top-k teacher."""
    H, k = manifest["target"]["hidden_size"], manifest["teacher"]["k"] or 0
    aux = {"float8_e4m3fn": 1, "bfloat16": 2, "float16": 2, "float32": 4}[manifest["aux_dtype"]]
    scales = 12 if manifest["aux_dtype"] == "float8_e4m3fn" else 0
    return 3 * H * aux + scales + 8 * k + 5 + 16 * sequences / tokens


def dump_facts(sections: dict) -> dict:
    """The dump's stored aux dtype, tokens and bytes per token (measured, and the format's formula)."""
    from stages import shards

    out = Path(sections["dump-teacher"]["out"])
    if not (out / "manifest.json").is_file():
        return {}
    manifest = shards.read_json(out / "manifest.json")
    dones = [shards.read_done(out, i, manifest["num_shards"]) for i in range(manifest["num_shards"])]
    if any(d is None for d in dones):
        return {}
    tokens = sum(d["num_tokens"] for d in dones)
    sequences = sum(d["records"]["written"] for d in dones)
    part_bytes = sum(p["bytes"] for d in dones for p in d["parts"])
    return {"aux_dtype": manifest["aux_dtype"], "tokens": tokens, "bytes": part_bytes,
            "bytes_per_token": part_bytes / tokens if tokens else None,
            "formula_bytes_per_token": formula_bytes_per_token(manifest, tokens, sequences) if tokens else None}


def train_facts(sections: dict) -> dict:
    """Steps and packed positions of the finished training (from its train_summary.json)."""
    path = Path(sections["train"]["out"]) / "train_summary.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    settings = summary.get("settings", {})
    rows = settings.get("batch_size", 0) * settings.get("grad_accum", 1) * settings.get("world_size", 1)
    return {"steps": summary.get("steps"), "positions": (summary.get("steps") or 0) * rows * settings.get("seq_len", 0),
            "seconds": summary.get("wall_time_s"), "final_loss": (summary.get("final_metrics") or {}).get("loss"),
            "final_acc": (summary.get("final_metrics") or {}).get("acc"),
            "held_out_simulated_al": (summary.get("final_eval") or {}).get("eval_acceptance_length"),
            "held_out_acc": (summary.get("final_eval") or {}).get("eval_acc")}


# ------------------------------------------------------------------------------------------------ the table
def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _mean_lists(lists):
    """Element-wise mean of equal-length lists (per-position rates over seeds); None where any is missing."""
    lists = [x for x in lists if x]
    if not lists or any(v is None for x in lists for v in x):
        return None
    return [statistics.fmean(column) for column in zip(*lists)]


def table(plan: dict, results: list[dict]) -> list[dict]:
    """One row per arm, in plan order: means over seeds, every seed's AL kept."""
    rows = []
    for arm in plan["arms"]:
        mine = [r for r in results if r["arm"] == arm["name"]]
        if not mine:
            rows.append({"arm": arm["name"], "factor": str(arm.get("factor", arm["name"])), "measured": False})
            continue
        k_values = sorted({r["k"] for r in mine})
        by_k = {k: [r for r in mine if r["k"] == k] for k in k_values}
        first = by_k[k_values[0]]
        categories = {}
        for r in first:
            for name, g in (r["summary"].get("per_category") or {}).items():
                categories.setdefault(name, []).append(g["acceptance_length"])
        ordered = [c for c in CATEGORY_ORDER if c in categories] + sorted(set(categories) - set(CATEGORY_ORDER))
        train_runs = {r["sections"]["train"]["out"]: r["train"] for r in mine}  # one per seed
        rows.append({
            "arm": arm["name"], "factor": first[0]["factor"], "measured": True,
            "seeds": sorted({r["seed"] for r in mine}, key=lambda seed: (seed is None, seed)),
            "acceptance_length": {str(k): _mean(r["summary"]["acceptance_length"] for r in by_k[k]) for k in k_values},
            "acceptance_length_per_seed": {str(k): [r["summary"]["acceptance_length"] for r in by_k[k]] for k in k_values},
            "acceptance_length_sd": {str(k): (statistics.stdev([r["summary"]["acceptance_length"] for r in by_k[k]])
                                              if len(by_k[k]) > 1 else None) for k in k_values},
            "per_category": {c: _mean(categories[c]) for c in ordered}, "per_category_k": k_values[0],
            "num_prompts": first[0]["summary"].get("num_prompts"), "num_turns": first[0]["summary"].get("num_turns"),
            "lossless": all(r["summary"]["lossless"] for r in mine),
            "engine": first[0]["sections"].get("eval", {}).get("engine", "hf"),
            "per_position_acceptance": {str(k): _mean_lists(r["summary"].get("per_position_acceptance") for r in by_k[k])
                                        for k in k_values},
            "tokens_per_s": {str(k): _mean(r["summary"].get("tokens_per_s") for r in by_k[k]) for k in k_values},
            "baseline_tokens_per_s": {str(k): _mean(r["summary"].get("baseline_tokens_per_s") for r in by_k[k])
                                      for k in k_values},
            "train_steps": _mean(t.get("steps") for t in train_runs.values()),
            "trained_positions": _mean(t.get("positions") for t in train_runs.values()),
            "train_seconds": _mean(t.get("seconds") for t in train_runs.values()),
            "eval_seconds": {str(k): _mean((r["summary"].get("stage_seconds") or {}).get("eval") for r in by_k[k])
                             for k in k_values},
            "held_out_simulated_al": _mean(t.get("held_out_simulated_al") for t in train_runs.values()),
            "regenerated_tokens": first[0].get("regenerated_tokens"),
            "dump_tokens": first[0]["summary"].get("tokens"),
            "dump_bytes_per_token": (first[0].get("dump") or {}).get("bytes_per_token"),
            "dump_formula_bytes_per_token": (first[0].get("dump") or {}).get("formula_bytes_per_token"),
            "supervised_tokens": first[0]["summary"].get("supervised_tokens"),
        })
    return rows


def compare(plan: dict, rows: list[dict]) -> list[dict]:
    """The plan's `compare: [[arm, baseline], ...]`: arm / baseline of the acceptance length at each K both
    measured, of the held-out simulated AL and of the dump's bytes per token."""
    by_arm = {r["arm"]: r for r in rows if r["measured"]}
    out = []
    for arm, base in plan.get("compare") or []:
        if arm not in by_arm or base not in by_arm:
            out.append({"arm": arm, "baseline": base, "measured": False})
            continue
        x, y = by_arm[arm], by_arm[base]

        def ratio(u, v):
            return u / v if u is not None and v else None

        out.append({"arm": arm, "baseline": base, "measured": True,
                    "acceptance_length": {k: ratio(x["acceptance_length"][k], y["acceptance_length"][k])
                                          for k in x["acceptance_length"] if k in y["acceptance_length"]},
                    "held_out_simulated_al": ratio(x["held_out_simulated_al"], y["held_out_simulated_al"]),
                    "dump_bytes_per_token": ratio(x.get("dump_bytes_per_token"), y.get("dump_bytes_per_token"))})
    return out


def markdown(rows: list[dict]) -> str:
    k_values = sorted({int(k) for r in rows if r["measured"] for k in r["acceptance_length"]})
    cats = []
    for r in rows:
        for c in r.get("per_category") or {}:
            if c not in cats:
                cats.append(c)

    def num(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    def al(r, k):
        v = r["acceptance_length"].get(str(k))
        if v is None:
            return "-"
        sd = r["acceptance_length_sd"].get(str(k))
        return num(v, ".3f") + (f" ± {sd:.3f}" if sd is not None else "")

    head = (["arm", "factor"] + [f"AL K={k}" for k in k_values] + cats +
            ["engine", "accepted per position", "tok/s (plain)", "lossless", "steps", "positions", "train s",
             "eval s", "held-out sim. AL", "bytes/token"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r["measured"]:
            lines.append("| " + " | ".join([r["arm"], r["factor"]] + ["not run"] + [""] * (len(head) - 3)) + " |")
            continue
        eval_s = "/".join(num(v, ".0f") for v in r["eval_seconds"].values())
        first_k = str(r["per_category_k"])
        per_position = r.get("per_position_acceptance", {}).get(first_k)
        speed = (f"{num(r.get('tokens_per_s', {}).get(first_k), '.1f')} "
                 f"({num(r.get('baseline_tokens_per_s', {}).get(first_k), '.1f')})")
        cells = ([r["arm"], r["factor"]] + [al(r, k) for k in k_values] + [num(r["per_category"].get(c)) for c in cats] +
                 [r.get("engine", "hf"), "/".join(num(v, ".3f") for v in per_position) if per_position else "-", speed,
                  "yes" if r["lossless"] else "NO", num(r["train_steps"], ".0f"), num(r["trained_positions"], ".3g"),
                  num(r["train_seconds"], ".0f"), eval_s, num(r["held_out_simulated_al"], ".3f"),
                  num(r.get("dump_bytes_per_token"), ".1f")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", type=Path, help="the plan YAML (bench/ablations/plans/*.yaml)")
    p.add_argument("--arms", default=None, help="comma-separated arm names to run (default: all)")
    p.add_argument("--lock", default=None, help="run every `eagle-pipe run` under `flock LOCK`")
    p.add_argument("--table", action="store_true", help="run nothing; print the table of what is measured")
    p.add_argument("--dry-run", action="store_true", help="write the pipeline files, print the commands, run nothing")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="a ${NAME} of the plan (else taken from the environment; repeat for several)")
    add_save_flag(p, "recipe-PLAN")
    args = p.parse_args(argv)
    bad = [v for v in args.var if "=" not in v]
    if bad:
        raise SystemExit(f"--var {bad[0]}: expected NAME=VALUE")
    plan = load_plan(args.plan, dict(v.split("=", 1) for v in args.var))
    work = Path(plan.get("work", REPO / "work" / "recipe"))
    units = expand(plan, args.plan)
    wanted = set(args.arms.split(",")) if args.arms else None
    if wanted and wanted - {u.arm for u in units}:
        raise SystemExit(f"unknown arm(s): {sorted(wanted - {u.arm for u in units})}")
    results = []
    for unit in units:
        if args.table or (wanted and unit.arm not in wanted):
            path = work / "arms" / unit.arm / f"result-{unit.tag}.json"
            if path.is_file():
                results.append(json.loads(path.read_text()))
            continue
        result = run_unit(unit, work, args.lock, args.dry_run)
        if result is not None:
            results.append(result)
    rows = table(plan, results)
    report = {"plan": str(args.plan), "work": str(work), "arms": rows, "compare": compare(plan, rows)}
    print(json.dumps(report, indent=1))
    print(markdown(rows))
    if args.save:
        save_result(args.save.replace("PLAN", args.plan.stem), report)


if __name__ == "__main__":
    main()
