"""What every benchmark does last: write its record as JSON and say where."""
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
