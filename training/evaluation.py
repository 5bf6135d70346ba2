"""The trainer's periodic evaluation: the EMA model samples a grid of the run's evaluation conditions
(every class; for text, ``data.eval_prompts``) at the checkpoint's sampling settings, scored by
the evaluator the data config names (inference/evaluation.py). Rank 0 samples; under FSDP it
samples a plain copy of the gathered EMA weights."""
from __future__ import annotations

import json
from pathlib import Path

from data.evaluator import make_evaluator
from inference.conditioning import ConditioningError
from inference.evaluation import EvalSpec, evaluate
from inference.pipeline import SampleSettings
from models.linear import load_portable
from models.presets import build_model
from training.distributed import barrier
from training.logger import log
from training.setup import RunSpec


class TrainingEvaluation:
    def __init__(self, cfg, spec: RunSpec, parallel, ema, logger, run_dir: Path):
        self.spec, self.parallel, self.ema, self.logger = spec, parallel, ema, logger
        self.family, self.samples_dir = cfg.model.family, run_dir / "samples"
        s = cfg.train.sample
        try:
            values = spec.conditioning.default_inputs()
        except ConditioningError:
            values = []  # text without evaluation prompts
        self.eval_spec = EvalSpec(values, cfg.data.eval_samples, SampleSettings(s.steps, s.cfg_scale, s.solver, spec.shift, s.seed,
                                                                                    spec.objective),
                                  spec.latent_shape, make_evaluator(cfg.data.get("evaluator"), decode=self._decode_stored),
                                  [tuple(hw) for hw in (cfg.data.get("eval_aspects") or [])], spec.autoencoder.downsample,
                                  int(cfg.data.eval_batch))

    def _decode_stored(self, raw):
        """Latents as the shards store them (raw, unscaled) -> images in [-1, 1]: an FID reference of latent shards."""
        ae = self.spec.autoencoder
        return ae.decode(ae.normalize(raw.to(self.parallel.dist_info.device)))

    def run(self, step: int) -> dict:
        """Every rank calls it (the FSDP gather is collective); rank 0 returns the scores."""
        result = {}
        sampler = self.parallel.full_weights(self.ema)
        dist_info = self.parallel.dist_info
        if dist_info.is_main:
            if isinstance(sampler, dict):  # gathered FSDP weights: sample with a plain copy
                weights, sampler = sampler, build_model(self.family, self.spec.model_config).to(dist_info.device).eval()
                load_portable(sampler, weights)
            result = self._evaluate(sampler, step)
        barrier(dist_info)
        return result

    def _evaluate(self, model, step: int) -> dict:
        if not self.eval_spec.values:
            log.info("no evaluation prompts (data.eval_prompts is empty): skipping the evaluation")
            return {}
        result = evaluate(model, self.spec.autoencoder, self.spec.conditioning, self.eval_spec, self.parallel.dist_info.device,
                          self.samples_dir / f"step_{step:07d}.png")
        setup = result.pop("fid_setup", None)
        if setup is not None:  # what pins the FID (reference set, resize, weights): once per run, beside the grids
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            (self.samples_dir / "fid_setup.json").write_text(json.dumps(setup, indent=2))
        self.logger.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        self.logger.log(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        self.logger.images(step, {f"eval/{k}": v for k, v in result.items() if k.startswith("grid")})
        return result
