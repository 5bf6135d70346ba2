"""`make demo`: train the five-stage curriculum small on CPU; sample grids and an evaluation table.

    python scripts/run_demo.py [--profile quick|quality|long] [--out DIR] [--stages stage1 ... stage5]
                               [--weights ema|raw] [Hydra overrides ...]

Stage 1 (class-conditional ccDiT, 16 px), stage 2 (text mmDiT, started from stage 1),
stage 3 (32 px), stage 4 (aspect-ratio buckets, micro-conditions) and stage 5 (score
subset, caption mix, lower LR, slower EMA); every hand-off goes through
reparameterize.py (EMA weights unless --weights raw).

Profiles: `quick` (default, `make demo`: all five stages in under 30 minutes on 2 CPU
cores, output runs/demo) and `quality` (the per-stage quality runs, each at most ~30
minutes on 2 CPU cores, output runs/quality; the same as `python train_stageN.py experiment=demo...`),
and `long` (for one GPU: stages 1-3 as in quality, then long_stage4 / long_stage5, output runs/long).

Each stage runs as its own process (exactly the command a user would type). Running the
demo again skips stages that reached their max_steps (nothing is trained or evaluated
again) and resumes an interrupted stage from its latest checkpoint. Overrides apply to
every stage; 'stage3:key=value' to one stage only. Results: <out>/<stage>/samples/*.png,
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
sys.path.insert(0, str(ROOT))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402
STAGES = ["stage1", "stage2", "stage3", "stage4", "stage5"]
PROFILES = {  # profile -> (experiment per stage, default output folder)
    "quick": ({s: f"quick_{s}" for s in STAGES}, "runs/demo"),
    "quality": ({s: "demo" if s == "stage1" else f"demo_{s}" for s in STAGES}, "runs/quality"),
    # for one GPU: the quality runs of stages 1-3, then stages 4-5 long enough for non-square canvases
    "long": ({"stage1": "demo", "stage2": "demo_stage2", "stage3": "demo_stage3", "stage4": "long_stage4", "stage5": "long_stage5"},
             "runs/long"),
}
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


def stage_config(stage: str, overrides: list[str]):
    """The stage's composed Hydra config, as its training script will see it."""
    from training.config import compose

    return compose(stage, overrides)


def finished_step(cfg, run_dir: Path) -> int | None:
    """The step a stage's run stopped at when it already reached the configured max_steps, else None."""
    summary = ROOT / run_dir / "summary.json"
    if not summary.is_file():
        return None
    step = json.loads(summary.read_text()).get("step", -1)
    return step if step >= cfg.train.max_steps else None


def asked_grid(stage: str, cfg) -> str | None:
    """The position grid 3to4 builds stage 4 with (``model.pos_grid``; the quick profile sets shortside);
    None for the other hand-offs, which carry the previous stage's grid."""
    grid = cfg.model.get("pos_grid") if stage == "stage4" else None
    return str(grid) if grid else None


def transition_args(stage: str, cfg) -> list[str]:
    """reparameterize.py's arguments for the hand-off into ``stage``."""
    grid = asked_grid(stage, cfg)
    return [*TRANSITION_ARGS[stage], *(["--pos-grid", grid] if grid else [])]


def _built_grid(meta: dict) -> str:
    return meta.get("model_config", {}).get("pos_grid") or "stretch"  # absent in older checkpoints: the default


def stale_init(init: Path, previous: Path, weights: str, pos_grid: str | None = None) -> str | None:
    """What an existing <stage>_init was built from, when that is no longer the previous stage's final
    checkpoint (the previous stage trained further, or other weights or another position grid were
    asked for); else None. An init that carries the grid (every hand-off but 3to4, which builds the
    one asked for) must hold the grid of the previous stage's final checkpoint: a stage 4 retrained
    with another grid makes stage5_init stale."""
    meta_path, summary_path = ROOT / init / "meta.json", ROOT / previous / "summary.json"
    if not meta_path.is_file() or not summary_path.is_file():
        return None
    meta, summary = json.loads(meta_path.read_text()), json.loads(summary_path.read_text())
    built = meta.get("init", {})
    if pos_grid is None and built.get("transition") != "3to4" and summary.get("checkpoint"):
        source_meta = ROOT / summary["checkpoint"] / "meta.json"
        pos_grid = _built_grid(json.loads(source_meta.read_text())) if source_meta.is_file() else None
    if pos_grid and _built_grid(meta) != pos_grid:
        return f"pos_grid {_built_grid(meta)}"
    report = ROOT / init / "report.json"
    built_weights = json.loads(report.read_text()).get("weights", weights) if report.is_file() else weights
    if "source_step" not in built or (built["source_step"] == summary.get("step") and built_weights == weights):
        return None  # (an init from before the field existed is taken as it is)
    return f"{built_weights} weights of step {built.get('source_step')}"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                    help="quick: all five stages in < 30 min (make demo); quality: the per-stage quality runs (each <= ~30 min "
                         "on 2 CPU cores); long: quality for stages 1-3, then stages 4-5 with 5.3x / 3x the steps (for a GPU)")
    ap.add_argument("--out", default=None, help="folder for every stage's run directory (default: runs/demo, runs/quality or runs/long)")
    ap.add_argument("--stages", nargs="+", default=STAGES, metavar="STAGE", help=f"stages to run, in order (default: all of {STAGES})")
    ap.add_argument("--weights", choices=["ema", "raw"], default="ema", help="which weights of a stage start the next one")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every stage; 'stage2:key=value' for one stage only")
    args = ap.parse_args(argv)
    # overrides may also follow --stages: anything with '=' is an override
    args.overrides += [s for s in args.stages if "=" in s]
    args.stages = [s for s in args.stages if "=" not in s]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        ap.error(f"--stages {' '.join(unknown)}: expected some of {', '.join(STAGES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    experiments, default_out = PROFILES[args.profile]
    out = Path(args.out or default_out)
    rows = []
    for stage in args.stages:
        run_dir = out / stage
        mine = [o.split(":", 1)[1] if o.startswith(f"{stage}:") else o for o in args.overrides
                if ":" not in o.split("=", 1)[0] or o.startswith(f"{stage}:")]
        command = [f"experiment={experiments[stage]}", f"run_dir={run_dir}"]
        cfg = stage_config(stage, [*command, *mine])
        done = finished_step(cfg, run_dir)
        if done is not None:
            print(f"\n=== {stage}: finished earlier at step {done} ({run_dir}/summary.json); nothing to train", flush=True)
            continue
        t = time.time()
        extra = []
        if stage != "stage1":  # start from the previous stage through reparameterize.py (once)
            init = out / f"{stage}_init"
            previous = out / STAGES[STAGES.index(stage) - 1]
            stale = stale_init(init, previous, args.weights, asked_grid(stage, cfg))
            if stale and (ROOT / run_dir / "checkpoints").is_dir():
                raise SystemExit(f"{init} was built from {stale}, which is no longer what {stage} starts from ({previous} has "
                                 f"moved on, or other weights or another position grid are asked for), and {run_dir} has already "
                                 f"trained from it. Delete {run_dir} (and {init}) to train {stage} from a new init, or restore "
                                 f"{previous} and the settings.")
            if stale or not (ROOT / init / "meta.json").is_file():
                if stale:
                    print(f"\n=== {init} was built from {stale}; rebuilding it from {previous}", flush=True)
                run([sys.executable, ROOT / "reparameterize.py", previous, init, "--weights", args.weights,
                     *transition_args(stage, cfg), "--force"])
            extra = [f"stage.init_from={init}"]
        run([sys.executable, ROOT / f"train_{stage}.py", *command, *extra, *mine])
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
        aspects = sorted(k[len(f"eval_{key}_"):] for k in s if k.startswith(f"eval_{key}_"))  # per size, e.g. 24x48
        if aspects:
            attrs = ", ".join(f"{a}: {s[f'eval_{key}_{a}']:.3f}" for a in aspects) + f" ({attrs})"
        grids = s.get("eval_grid") or " ".join(s[f"eval_grid_{a}"] for a in aspects if f"eval_grid_{a}" in s)
        lines.append(f"| {stage} | {s['step']} | {wall} | {loss} | {s.get(f'eval_{key}', float('nan')):.3f} | {what} "
                     f"| {chance} | {attrs} | {grids} |")
    table = "\n".join(lines)
    (ROOT / out / "eval_table.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nsample grids: {out}/<stage>/samples/   evaluation table: {out}/eval_table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
