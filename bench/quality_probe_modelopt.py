"""Probe after bench/quality.py: what do Model-Optimizer's export/forward quirks cost?
(1) the YaRN x32 rope_scaling its recipe writes at export: eval the same weights with the RoPE they trained with;
(2) input_layernorm applied to the hidden stream in training only: how far its weights moved from 1.
usage: python bench/quality_probe_modelopt.py WORK DUMP TARGET   (WORK: a finished bench/quality.py --work dir)"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from safetensors.torch import load_file
from quality_convert import convert_peer_export

W, DUMP, TARGET = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
res = json.loads((W / "result.json").read_text())
ev, data = res["budget"]["eval"], res["budget"]["data"]
src = W / "modelopt" / "export"
w = load_file(str(src / "model.safetensors"))
il = w["layers.0.input_layernorm.weight"].float(); hn = w["layers.0.hidden_norm.weight"].float()
out = {"input_layernorm_weight": {"mean": il.mean().item(), "mean_abs_dev_from_1": (il - 1).abs().mean().item(),
                                  "min": il.min().item(), "max": il.max().item()},
       "hidden_norm_weight_mean": hn.mean().item()}
noyarn = W / "probe" / "modelopt-export-noyarn"
shutil.rmtree(noyarn, ignore_errors=True); noyarn.mkdir(parents=True)
cfg = json.loads((src / "config.json").read_text()); cfg.pop("rope_scaling", None)
(noyarn / "config.json").write_text(json.dumps(cfg)); shutil.copy(src / "model.safetensors", noyarn)
conv = W / "probe" / "modelopt-noyarn-converted"; shutil.rmtree(conv, ignore_errors=True)
convert_peer_export(noyarn, DUMP / "target", conv, data["aux_layer_ids"], res["budget"]["ttt_steps"])
for tag, bench, n in [("bench", ev["bench"], ev["num_prompts"]), ("bench2", ev["bench2"], ev["num_prompts2"])]:
    if not bench:
        continue
    cmd = [sys.executable, "-m", "stages.cli", "eval", "--target", TARGET, "--draft", str(conv), "--data", bench,
           "--num-prompts", str(n), "--max-new-tokens", str(ev["max_new_tokens"]), "--draft-tokens",
           str(ev["draft_tokens"]), "--dtype", "float32", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent.parent))
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    out[f"noyarn_{tag}_AL"] = rep["acceptance_length"]; out[f"noyarn_{tag}_lossless"] = rep["lossless"]
    out[f"noyarn_{tag}_per_category"] = {c: g["acceptance_length"] for c, g in rep["per_category"].items()}
print(json.dumps(out, indent=1))
(W / "probe" / "modelopt_probe.json").write_text(json.dumps(out, indent=1) + "\n")
