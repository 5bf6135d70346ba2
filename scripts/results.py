"""What the benchmarks share: their record as JSON, a trained or reused checkpoint, a reparameterized
init made once, a line chart."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(record: dict, out: str | Path) -> dict:
    """``record`` as indented JSON at ``out`` (parent folders made); returns ``record``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return record


def trained_seconds(checkpoint: str | Path) -> float | None:
    """The training time its run recorded (``summary.json`` beside ``checkpoints/``), for a benchmark
    that reuses a trained checkpoint instead of training it again; None when the run has no summary."""
    summary = Path(checkpoint).resolve().parents[1] / "summary.json"
    return json.loads(summary.read_text()).get("seconds") if summary.is_file() else None


def reparameterized(source: str, init: str | Path, *options: str) -> None:
    """``init`` made once from ``source`` by reparameterize.py with ``options`` (paths relative to the
    checkout); a run that finds it there already uses it as it is."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    if not (root / init / "meta.json").is_file():
        subprocess.run([sys.executable, str(root / "reparameterize.py"), source, str(init), *options], cwd=root, check=True)


def trained(config_name: str, overrides: list[str], checkpoint: str | Path | None) -> tuple[str, float | None]:
    """A benchmark's trained checkpoint and its training seconds: ``checkpoint`` as given (with the time its run
    recorded), or a run of the ``config_name`` entry point with ``overrides``, trained now (resumed where its
    run_dir holds one)."""
    if checkpoint is not None:
        return str(checkpoint), trained_seconds(checkpoint)
    from training.config import compose
    from training.trainer import train

    summary = train(compose(config_name, overrides))
    return summary["checkpoint"], summary["seconds"]


def line_chart(curves: dict[str, list[tuple[float, float]]], target: float, out: str | Path, title: str, xlabel: str) -> None:
    """A plain PIL line chart (no matplotlib dependency): a score in [0, 1] against ``xlabel`` per arm,
    the ``target`` score as a red line."""
    from PIL import Image, ImageDraw

    w, h, m, legend = 640, 400, 50, 170  # the legend in its own column right of the plot, off the curves
    img = Image.new("RGB", (w + legend, h), "white")
    d = ImageDraw.Draw(img)
    max_x = max((x for pts in curves.values() for x, _ in pts), default=1) or 1
    xy = lambda x, a: (m + (w - 2 * m) * x / max_x, h - m - (h - 2 * m) * a)  # noqa: E731
    d.rectangle([m, m, w - m, h - m], outline="black")
    for a in sorted({0.25, 0.5, 0.75, 1.0, target}):
        y = xy(0, a)[1]
        d.line([m, y, w - m, y], fill=(255, 150, 150) if a == target else (200, 200, 200))
        d.text((8, y - 6), f"{a:.2f}", fill="black")
    for i in range(6):
        x = max_x * i / 5
        d.text((xy(x, 0)[0] - 10, h - m + 6), f"{x:.3g}", fill="black")
    d.text((w // 2 - 20, h - 18), xlabel, fill="black")
    d.text((m, 12), title, fill="black")
    colours = [(30, 90, 220), (220, 60, 30), (40, 160, 60), (150, 60, 180), (200, 140, 0), (0, 150, 160), (120, 120, 120),
               (230, 0, 130), (0, 0, 0), (140, 90, 30), (110, 190, 255), (160, 200, 40)]
    for i, (name, pts) in enumerate(curves.items()):
        c = colours[i % len(colours)]
        if len(pts) > 1:
            d.line([xy(x, a) for x, a in pts], fill=c, width=3)
        for x, a in pts:
            px, py = xy(x, a)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        d.line([w - m + 12, m + 16 * i + 6, w - m + 30, m + 16 * i + 6], fill=c, width=3)
        d.text((w - m + 36, m + 16 * i), name, fill=c)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
