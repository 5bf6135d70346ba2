"""The demo's stage 1 trained with each linear backend: evaluator score at the same steps.

    python scripts/bench_precision.py                               # torch vs mxfp8_emulated, quick stage 1
    python scripts/bench_precision.py --experiment demo --eval-samples 480   # the 3500-step demo (slow)

Each backend trains `train_stage1.py experiment=<experiment> precision=<backend>` in its own
run directory (runs/bench_precision/<backend>; an interrupted arm resumes, a finished one is
reused), same seed, data and steps. Each final EMA checkpoint is then scored by
scripts/evaluate_checkpoint.py with the same samples, seeds and guidance (sampling in fp32 for
both: the comparison is of what the training produced). Prints a table and
writes JSON (default bench/precision.json).
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

from scripts.results import write_json  # noqa: E402
from models.cli import HelpFormatter  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--experiment", default="quick_stage1")
    ap.add_argument("--backends", nargs="+", default=["torch", "mxfp8_emulated"])
    ap.add_argument("--eval-samples", type=int, default=480, help="samples per evaluation (40 per class)")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--out-dir", default="runs/bench_precision")
    ap.add_argument("--out", default="bench/precision.json")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for every arm")
    args = ap.parse_args(argv)
    from scripts.evaluate_checkpoint import main as evaluate_checkpoint

    rows = []
    for backend in args.backends:
        run_dir = Path(args.out_dir) / backend
        t = time.time()
        subprocess.run([sys.executable, str(ROOT / "train_stage1.py"), f"experiment={args.experiment}", f"precision={backend}",
                        f"run_dir={run_dir}", "train.sample_every=0", *args.overrides], cwd=ROOT, check=True)
        train_s = time.time() - t
        summary = json.loads((ROOT / run_dir / "summary.json").read_text())
        scores = evaluate_checkpoint([str(ROOT / run_dir), "--cfg", str(args.cfg), "--n", str(args.eval_samples),
                                      "--out", str(ROOT / run_dir / "eval.json")])[0]
        rows.append({"backend": backend, "steps": summary["step"], "final_loss": summary["final_loss"],
                     "train_minutes_this_run": train_s / 60, "evaluation": scores})
    print("\n| backend | steps | final loss | class accuracy (EMA, CFG %g, %d samples) |" % (args.cfg, args.eval_samples))
    print("|---|---|---|---|")
    for r in rows:
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        print(f"| {r['backend']} | {r['steps']} | {loss} | {_score(r['evaluation']):.1%} |")
    if len(rows) > 1:
        gap = 100 * (_score(rows[0]["evaluation"]) - _score(rows[1]["evaluation"]))
        print(f"\n{rows[0]['backend']} - {rows[1]['backend']}: {gap:+.1f} points")
    record = {"experiment": args.experiment, "cfg": args.cfg, "eval_samples": args.eval_samples, "arms": rows}
    return write_json(record, args.out)


def _score(evaluation: dict) -> float:
    return float(evaluation["class_accuracy"])  # shape and colour right: the class


if __name__ == "__main__":
    main()
