"""Distill the demo's stage-2 model into a few-step student (LCM on the flow ODE) and score both: the distillation proof.

    python scripts/bench_distill.py                                              # the quality run's stage 2 (make demo-quality)
    python scripts/bench_distill.py --teacher runs/demo/stage2/checkpoints/latest   # make demo's (runs/bench_distill_demo_stage2)

Trains ``train_distill.py experiment=demo_distill`` (the teacher frozen, a student with a guidance-scale
input, the EMA as target network) unless --student names a trained one. Then samples the demo's held-out
captions (never in any training data) with the same noise:
  teacher   Euler with classifier-free guidance at --teacher-steps (its own setting) and at each --steps
  student   multi-step consistency sampling (solver lcm) at each --steps, its guidance scale as an input
and scores them with the shapes evaluator (every captioned attribute right). Images per second of
each setting are measured here, alternating teacher and student, --repeats times. Writes --json and
--grid (rows: teacher at --teacher-steps, then teacher and student at each --steps).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402
from scripts.results import trained, write_json  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--teacher", default="runs/quality/stage2/checkpoints/latest",
                    help="the flow text checkpoint to distill (default: the quality run's stage 2, `make demo-quality` or "
                         "train_stage2.py experiment=demo_stage2; make demo's runs/demo/stage2 works too)")
    ap.add_argument("--student", default=None, help="a distilled checkpoint: skip training")
    ap.add_argument("--run-dir", default=None, help="the distillation run, resumed if it is there (default: named after the teacher, "
                                                     "e.g. runs/bench_distill_quality_stage2)")
    ap.add_argument("--train-steps", type=int, default=1100, help="distillation steps (batch 64; ~14 CPU-minutes on 2 cores)")
    ap.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides for the distillation run")
    ap.add_argument("--teacher-steps", type=int, default=20, help="the teacher's full sampling (Euler steps)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="few-step settings to compare")
    ap.add_argument("--samples", type=int, default=240, help="samples over the held-out captions, per setting")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per setting (alternating)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="docs/bench_distill.json")
    ap.add_argument("--grid", default="docs/bench_distill.png")
    args = ap.parse_args(argv)
    if args.run_dir is None:  # one run per teacher: a run is resumed, and never against another teacher than its own
        parts = [p for p in Path(args.teacher).parts if p not in ("runs", "checkpoints", "latest", "/", "..", ".") and not p.startswith("step_")]
        args.run_dir = "runs/bench_distill_" + "_".join(parts)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from data.evaluator import ShapesEvaluator
    from data.shapes import HELD_OUT_CAPTIONS
    from inference.images import make_grid, save_png, to_uint8
    from inference.pipeline import Pipeline
    from models.checkpoint import resolve

    if not Path(args.teacher).exists():
        raise SystemExit(f"--teacher {args.teacher}: no such checkpoint. The default is the quality run's stage 2 (`make demo-quality`, "
                         "or train_stage2.py experiment=demo_stage2); make demo's runs/demo/stage2/checkpoints/latest works too")
    teacher_path = str(resolve(args.teacher))
    args.student, seconds = trained("distill", [
        "experiment=demo_distill", f"stage.init_from={teacher_path}", f"run_dir={args.run_dir}",
        f"train.max_steps={args.train_steps}", f"seed={args.seed}", "train.sample_every=0",
        f"train.checkpoint_every={args.train_steps}", *args.overrides], args.student)
    teacher, student = Pipeline.load(teacher_path), Pipeline.load(args.student)
    evaluator = ShapesEvaluator()
    captions = [HELD_OUT_CAPTIONS[i % len(HELD_OUT_CAPTIONS)] for i in range(args.samples)]
    arms = [("teacher", args.teacher_steps)] + [(who, s) for s in args.steps for who in ("teacher", "student")]
    results, rows, timing = {}, [], {}
    for who, steps in arms:
        pipe = teacher if who == "teacher" else student
        settings = pipe.defaults(steps=steps, seed=args.seed)
        images = pipe(captions, settings, batch_size=256)
        score = evaluator.score(images, captions)
        results[f"{who}_{steps}"] = {"steps": steps, "solver": settings.solver, "cfg_scale": settings.cfg_scale,
                                     "caption_accuracy": round(float(score.pop("all")), 4),
                                     **{f"{k}_accuracy": round(float(v), 4) for k, v in score.items()}}
        rows.append(images[: len(HELD_OUT_CAPTIONS)])
        print(f"{who} {steps} steps ({settings.solver}): held-out caption accuracy {results[f'{who}_{steps}']['caption_accuracy']:.3f}",
              flush=True)
    batch = captions[:64]
    for _ in range(args.repeats):  # alternating, so the machine's noise hits every setting alike
        for who, steps in arms:
            pipe = teacher if who == "teacher" else student
            start = time.perf_counter()
            pipe(batch, pipe.defaults(steps=steps, seed=args.seed))
            timing.setdefault(f"{who}_{steps}", []).append(time.perf_counter() - start)
    for key, times in timing.items():
        results[key]["images_per_second"] = round(len(batch) / min(times), 1)
    save_png(make_grid(to_uint8(torch.cat(rows)), ncols=len(HELD_OUT_CAPTIONS), upscale=4), args.grid)
    full = results[f"teacher_{args.teacher_steps}"]["caption_accuracy"]
    result = {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
              "teacher": teacher_path, "student": str(args.student), "train_seconds": seconds, "train_steps": student.meta["step"],
              "samples": args.samples, "timing_batch": len(batch), "results": results,
              "student_4_minus_teacher_full_points": round(100 * (results.get("student_4", {}).get("caption_accuracy", 0) - full), 2)
              if "student_4" in results else None,
              "student_2_minus_teacher_2_points": round(100 * (results["student_2"]["caption_accuracy"]
                                                               - results["teacher_2"]["caption_accuracy"]), 2)
              if "student_2" in results else None,
              "grid_rows": [f"{w} {s} steps" for w, s in arms]}
    print(f"grid: {args.grid}")
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
