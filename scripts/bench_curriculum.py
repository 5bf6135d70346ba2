"""Does the curriculum pay? Stage 2 from the reparameterized stage 1 vs stage 2 from scratch.

    python scripts/bench_curriculum.py                        # both arms, ~20 min on 2 CPU cores
    python scripts/bench_curriculum.py --stage1 runs/quality/stage1 --steps 2500 --until 600 --eval-every 50

Both arms train the demo mmDiT on the captioned shapes (experiment=demo_stage2)
with identical settings (a --steps schedule, stopped at --until); only the initialization
differs. Every --eval-every steps the EMA model samples the held-out captions (CFG on) and the evaluator
scores full-caption accuracy (every captioned attribute right). The script
writes the two curves (PNG), and JSON with the steps each arm needed to reach
--target and their ratio. An arm that never reaches the target within --steps
within --until gives a bound (ratio_upper_bound). Runs resume: rerunning reuses finished arms.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.results import line_chart, reparameterized, write_json  # noqa: E402
from models.cli import HelpFormatter  # noqa: E402


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, caption accuracy) from a run's metrics.jsonl, last value per step."""
    points: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if "eval/caption_accuracy" in rec:
            points[int(rec["step"])] = float(rec["eval/caption_accuracy"])
    return sorted(points.items())


def steps_to(points: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, a in points if a >= target), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--stage1", default="runs/quality/stage1", help="stage-1 run or checkpoint to reparameterize")
    ap.add_argument("--out", default="runs/bench_curriculum", help="folder for both arms' runs")
    ap.add_argument("--steps", type=int, default=2500, help="the schedule's length (train.max_steps) for both arms")
    ap.add_argument("--until", type=int, default=600, help="stop both arms here (train.stop_after); the schedule stays --steps")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=240, help="samples per evaluation (20 per held-out prompt)")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--json", default="bench/curriculum.json")
    ap.add_argument("--png", default="docs/curriculum_stage2.png")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both arms")
    args = ap.parse_args(argv)
    out = Path(args.out)
    init = out / "stage2_init"
    reparameterized(args.stage1, init, "--caption-channels", "384")
    arms = {"from stage 1 (reparameterized)": str(init), "from scratch": "null"}
    results = {}
    for name, init_from in arms.items():
        run_dir = out / ("from_stage1" if init_from != "null" else "scratch")
        cmd = [sys.executable, str(ROOT / "train_stage2.py"), "experiment=demo_stage2", f"run_dir={run_dir}",
               f"stage.init_from={init_from}", f"train.max_steps={args.steps}", f"train.stop_after={args.until}",
               f"train.sample_every={args.eval_every}",
               f"train.checkpoint_every={args.eval_every}", f"data.eval_samples={args.eval_samples}", *args.overrides]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.time()
        done = ROOT / run_dir / "summary.json"
        if done.is_file() and json.loads(done.read_text()).get("step", 0) >= args.until:
            print("finished earlier: reusing its curve", flush=True)
        else:
            subprocess.run(cmd, cwd=ROOT, check=True)
        pts = curve(ROOT / run_dir)
        summary = json.loads((ROOT / run_dir / "summary.json").read_text())
        results[name] = {"run_dir": str(run_dir), "curve": pts, "steps_to_target": steps_to(pts, args.target),
                         "final_accuracy": pts[-1][1] if pts else None, "seconds_this_run": round(time.time() - t, 1),
                         "train_seconds": summary.get("seconds")}
    a, b = (results[k]["steps_to_target"] for k in arms)
    record = {"target": args.target, "steps": args.steps, "until": args.until, "eval_every": args.eval_every, "eval_samples": args.eval_samples,
              "arms": results, "ratio": None, "ratio_upper_bound": None}
    if a is not None and b is not None:
        record["ratio"] = a / b
    elif a is not None:  # scratch never got there: it needs more than `until`
        record["ratio_upper_bound"] = a / args.until
    line_chart({k: v["curve"] for k, v in results.items()}, args.target, ROOT / args.png,
               f"full-caption accuracy on held-out prompts (target {args.target:.0%}: red line)", "step")
    write_json(record, ROOT / args.json)
    print(f"\n| arm | steps to {args.target:.0%} | final accuracy |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v['steps_to_target'] or f'> {args.until}'} | {v['final_accuracy']} |")
    print(f"ratio {record['ratio']} (upper bound {record['ratio_upper_bound']}); curves {args.png}, JSON {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
