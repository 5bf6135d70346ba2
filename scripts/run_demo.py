"""`make demo`: train the curriculum small on CPU and write sample grids and the evaluation table.

    python scripts/run_demo.py [--out runs/demo] [--stages stage1 stage2] [extra Hydra overrides for every stage...]

Stage 1 (class-conditional ccDiT) then stage 2 (text mmDiT, started from stage 1
through reparameterize.py).
Each stage runs as its own process (exactly the command a user would type) and
resumes if it was interrupted: running the demo again continues where it
stopped and skips finished stages. Results: <out>/<stage>/samples/*.png,
<out>/<stage>/summary.json and the table <out>/eval_table.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["stage1", "stage2", "stage3", "stage4", "stage5"]
DEFAULT_STAGES = ["stage1", "stage2"]  # stages 3-5 run with --stages ...; their demo settings are not tuned yet
EXPERIMENT = {s: "demo" if s == "stage1" else f"demo_{s}" for s in STAGES}
TEXT_WIDTH = 384  # the demo's text encoder (MiniLM-L6) hidden size
TRANSITION_ARGS = {"stage2": ["--caption-channels", str(TEXT_WIDTH)], "stage3": ["--image-size", "32"], "stage4": [], "stage5": []}
_HELD_OUT = ("caption_accuracy", "every captioned attribute right, held-out captions", "1/72")
SCORES = {  # stage -> (main score, what it counts, chance)
    "stage1": ("class_accuracy", "class (shape + colour) right", "1/12"),
    "stage2": _HELD_OUT,
    "stage3": _HELD_OUT,
    "stage4": ("caption_accuracy", "held-out captions, mean over 1:1, 1:2, 2:1", "1/72"),
    "stage5": ("caption_accuracy", "held-out captions, mean over 1:1, 1:2, 2:1", "1/72"),
}


def run(cmd: list[str]) -> None:
    print(f"\n=== {' '.join(str(c) for c in cmd[1:])}", flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for every stage's run directory")
    ap.add_argument("--stages", nargs="+", default=DEFAULT_STAGES, choices=STAGES, help="stages to run, in order")
    ap.add_argument("--weights", choices=["ema", "raw"], default="ema", help="which weights of a stage start the next one")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every stage; 'stage2:key=value' for one stage only")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = []
    for stage in args.stages:
        run_dir = out / stage
        t = time.time()
        extra = []
        if stage != "stage1":  # start from the previous stage through reparameterize.py (once)
            init = out / f"{stage}_init"
            previous = out / STAGES[STAGES.index(stage) - 1]
            if not (ROOT / init / "meta.json").is_file():
                run([sys.executable, ROOT / "reparameterize.py", previous, init, "--weights", args.weights, *TRANSITION_ARGS[stage]])
            extra = [f"stage.init_from={init}"]
        mine = [o.split(":", 1)[1] if o.startswith(f"{stage}:") else o for o in args.overrides
                if ":" not in o.split("=", 1)[0] or o.startswith(f"{stage}:")]
        run([sys.executable, ROOT / f"train_{stage}.py", f"experiment={EXPERIMENT[stage]}", f"run_dir={run_dir}", *extra, *mine])
        summary = json.loads((ROOT / run_dir / "summary.json").read_text())
        rows.append((stage, summary, time.time() - t))
    ran = {stage for stage, _, _ in rows}
    for stage in STAGES:  # stages finished by an earlier invocation keep their row
        summary = ROOT / out / stage / "summary.json"
        if stage not in ran and summary.is_file():
            rows.append((stage, json.loads(summary.read_text()), None))
    rows.sort(key=lambda r: STAGES.index(r[0]))
    lines = [
        "| stage | steps | wall time this run | final loss | score (EMA, CFG) | what it counts | chance | per attribute | sample grid |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, s, dt in rows:
        key, what, chance = SCORES[stage]
        loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "(finished earlier)"
        attrs = ", ".join(f"{a} {s[f'eval_{a}_accuracy']:.3f}" for a in ("shape", "colour", "size", "background")
                          if f"eval_{a}_accuracy" in s)
        wall = f"{dt / 60:.1f} min" if dt is not None else f"(earlier run: {s.get('seconds', 0) / 60:.1f} min)"
        lines.append(f"| {stage} | {s['step']} | {wall} | {loss} | {s.get(f'eval_{key}', float('nan')):.3f} | {what} "
                     f"| {chance} | {attrs} | {s.get('eval_grid', '')} |")
    table = "\n".join(lines)
    (ROOT / out / "eval_table.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nsample grids: {out}/<stage>/samples/   evaluation table: {out}/eval_table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
