"""`make demo`: train the curriculum small on CPU and write sample grids and the evaluation table.

    python scripts/run_demo.py [--out runs/demo] [extra Hydra overrides for every stage...]

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
STAGES = ["stage1"]  # later stages join as they land (see README "Curriculum")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for every stage's run directory")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides passed to every stage")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = []
    for stage in STAGES:
        run_dir = out / stage
        cmd = [sys.executable, str(ROOT / f"train_{stage}.py"), "experiment=demo", f"run_dir={run_dir}", *args.overrides]
        print(f"\n=== {stage}: {' '.join(cmd[1:])}", flush=True)
        t = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        summary = json.loads((ROOT / run_dir / "summary.json").read_text())
        rows.append((stage, summary, time.time() - t))
    lines = [
        "| stage | steps | wall time this run | final loss | class accuracy (EMA, CFG) | shape | colour | sample grid |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage, s, dt in rows:
        loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "(finished earlier)"
        lines.append(
            f"| {stage} | {s['step']} | {dt / 60:.1f} min | {loss} | {s.get('eval_class_accuracy', float('nan')):.3f} "
            f"| {s.get('eval_shape_accuracy', float('nan')):.3f} | {s.get('eval_colour_accuracy', float('nan')):.3f} | {s.get('eval_grid', '')} |"
        )
    table = "\n".join(lines)
    (ROOT / out / "eval_table.md").write_text(table + "\n\nchance: class 1/12 = 0.083, shape 1/3, colour 1/4\n")
    print("\n" + table)
    print(f"\nsample grids: {out}/<stage>/samples/   evaluation table: {out}/eval_table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
