"""The trainer shared by every stage: parts, then a short loop.

A stage differs from another only in its config (configs/stage/*.yaml). The parts: the run
spec (training/setup.py: checks, data, conditioning, model config), where the run starts
(training/resume.py), the model spread over ranks (training/parallel.py), the data feed
(training/feed.py), the one training step (training/step.py), evaluation
(training/evaluation.py) and checkpoints (training/checkpoint.py). A run continues exactly
from any checkpoint: same step, optimizer, EMA, data position and random stream.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from data.shards import ShardError, is_bucketed
from inference.conditioning import ConditioningError
from models.adapters import AdapterError, adapter_fraction, add_lora
from models.checkpoint import CheckpointError, base_record, checkpoint_meta, latest_checkpoint
from models.presets import build_model, count_parameters
from training import precision, setup
from training.checkpoint import Checkpointer
from training.config import ConfigError
from training.alignment import SelfAlignment
from training.distill import DRAWS
from training.distributed import DistInfo, cleanup, replica_divergence
from training.distributed import setup as setup_processes
from training.ema import ema_decay_at, make_ema
from training.evaluation import TrainingEvaluation
from training.feed import Feed
from training.guards import PREEMPTED_EXIT_CODE, NonFiniteGuard, StopRequest
from training.logger import Meter, RunLogger, log, setup_console
from training.optim import lr_at, make_optimizer
from training.parallel import wrap
from training.resume import init_weights, resume_or_init
from training.step import step_generator, train_step

__all__ = ["train", "main", "ConfigError"]

# A user's mistake (a setting, a checkpoint, a data folder): the message says what to do, a traceback adds nothing.
USER_ERRORS = (ConfigError, CheckpointError, ShardError, ConditioningError, AdapterError)


def main(cfg: DictConfig) -> None:
    """What ``train_stageN.py`` runs: ``train(cfg)``, with a user's mistake reported as one message on
    stderr and exit status 1 instead of a traceback."""
    try:
        train(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) one stage. Returns a summary: step, loss, checkpoint, evaluation."""
    stop = StopRequest().install()  # before anything slow: a pre-emption at start-up still exits 75
    dist_info = setup_processes()
    setup_console(dist_info.is_main)
    run_dir = setup.run_directory(cfg)
    lock = None
    try:
        if dist_info.is_main:  # one trainer per run_dir, and the project's own messages for a bad one
            lock = setup.prepare_run_dir(run_dir)
        return run(cfg, dist_info, stop, run_dir)
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()
        cleanup(dist_info)


class Run:
    """The parts of one run, built in the order the random stream and the checks need."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, run_dir: Path):
        self.cfg, self.dist_info, self.run_dir = cfg, dist_info, run_dir
        self.spec = spec = setup.resolve(cfg, dist_info, run_dir)  # checks, data, conditioning: before any weight exists
        parallel_kind = cfg.train.get("parallel", "ddp")
        if parallel_kind not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel={parallel_kind!r}: expected ddp or fsdp")
        use_fsdp = parallel_kind == "fsdp" and dist_info.enabled
        lora = setup.lora_spec(cfg, use_fsdp)
        model = precision.apply(build_model(cfg.model.family, spec.model_config).to(dist_info.device), cfg.precision)
        self.adapter = None
        if lora.enabled:  # the frozen base first, then the adapters around its linears; checkpoints hold the adapters
            self.adapter = {**lora.to_meta(), "base": base_record(cfg.stage.init_from)}
            init_weights(model, None, cfg.stage.init_from, asdict(spec.model_config), cfg.model.family)
            model = add_lora(model, lora)
            trained, frozen = adapter_fraction(model)
            log.info("LoRA rank %d (alpha %s) on %s: %d adapter parameters, %.2f%% of the base's %d (frozen)", lora.rank,
                     lora.alpha if lora.alpha is not None else lora.rank, ", ".join(lora.target_modules), trained,
                     100 * trained / frozen, frozen)
        if getattr(spec.model_config, "control_blocks", 0):
            freeze_base(model, cfg, lora.enabled, use_fsdp)
        routing = setup.routing_spec(cfg, spec.model_config)
        # routed steps draw one route score per image token (patch size; 0 = none), before train.routing.until (None: all)
        self.route_patch, self.routing_until = 0, None
        self.ema_restarts: list[int] = []  # steps where the EMA's warm-up starts again (a new regime's average)
        if routing is not None:
            model.routing = routing
            until = cfg.train.routing.get("until")
            self.route_patch, self.routing_until = spec.model_config.patch_size, until
            dense = f"; every token is trained from step {until} on" if until else ""
            if until and cfg.train.routing.get("restart_ema"):  # the finish's EMA averages the finish's weights only
                self.ema_restarts.append(int(until))
                dense += ", where the EMA's warm-up starts again"
            if routing.mask:
                where = f"after block {routing.start - 1}" if routing.start else "before block 0 (no patch mixer)"
                log.info("deferred masking: %.0f%% of the image tokens are dropped %s in training, the loss counts the "
                         "rest (sampling sees every token)%s", 100 * routing.ratio, where, dense)
            else:
                log.info("token routing: %.0f%% of the image tokens skip blocks %d-%d in training (sampling sees every token)%s",
                         100 * routing.ratio, routing.start, routing.end - 1, dense)
        self.lowres = setup.lowres_spec(cfg, spec)
        if self.lowres is not None:
            lo = self.lowres
            if lo.restart_ema:
                self.ema_restarts.append(lo.until)
            h, w = spec.latent_shape[1:]
            sizes = ("each bucket's sides divided" if is_bucketed(spec.manifest)
                     else f"{h // lo.factor}x{w // lo.factor} for {h}x{w}")
            log.info("low-resolution warm-up: steps before %d train on the latents average-pooled by %d (%s), "
                     "then at full resolution%s; evaluations and sampling are at full resolution", lo.until, lo.factor,
                     sizes, ", where the EMA's warm-up starts again" if lo.restart_ema else "")
        self.ema = make_ema(model)
        optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
        self.start = resume_or_init(cfg, model, self.ema, optimizer, self.run_dir / "checkpoints", asdict(spec.model_config),
                                    use_fsdp, self.adapter and self.adapter["base"])
        if dist_info.is_main:
            setup.check_free_space(self.run_dir, model)
        self.parallel, self.optimizer = wrap(cfg, model, self.ema, optimizer, self.start.optimizer_state, dist_info, use_fsdp,
                                             len(spec.manifest.get("buckets") or {}))
        self.feed = Feed(cfg, spec, dist_info, self.start.batches_done, self.start.positions)
        self.feed.masking = routing if routing is not None and routing.mask else None
        self.distill = make_distillation(cfg, spec, dist_info.device)
        self.align = None
        align = setup.align_spec(cfg, spec.model_config, routing, use_fsdp)
        if align is not None:  # hooks on the trained model and the EMA, after the EMA copy was made
            self.align = SelfAlignment(model, self.ema, align, spec.objective)
            log.info("self-alignment: block %d pulled toward the EMA's block %d at t - %g, weight %g%s", align.student_block,
                     align.teacher_block, align.gap, align.weight, f", until step {align.until}" if align.until is not None else "")
        self.repa = make_repa(cfg, spec, model, routing, use_fsdp, dist_info, self.start)
        self.feed.images = self.repa is not None and bool(spec.manifest.get("images"))
        if self.distill is not None:
            self.feed.extra_draws = DRAWS
        self.forward_context = precision.forward_context(cfg.precision, dist_info.device)  # an FP8 recipe this GPU can't run stops here
        log.info(
            "stage %s | %s %s, %.2fM params | data %s (%d samples) | global batch %d = %d ranks x %d x %d accum | device %s",
            cfg.stage.name, cfg.model.family, cfg.model.preset, count_parameters(model) / 1e6, spec.data_path,
            spec.manifest["num_samples"], cfg.train.global_batch_size, dist_info.world_size, spec.micro_batch, cfg.train.grad_accum,
            dist_info.device,
        )
        config_yaml = spec.recorded_config(cfg)
        if dist_info.is_main:
            log_config_changes(self.run_dir, config_yaml)
            (self.run_dir / "config.yaml").write_text(config_yaml)
        self.logger = RunLogger(self.run_dir, dist_info.is_main, cfg.train.max_steps, self.start.step,
                                cfg.train.get("report_to", "none"), cfg.train.wandb, OmegaConf.to_container(cfg, resolve=True))
        meta = run_meta(cfg, spec) | ({"adapter": self.adapter} if self.adapter else {})
        self.checkpoints = Checkpointer(self.run_dir / "checkpoints", meta, config_yaml, cfg.train.keep_last,
                                        cfg.train.keep_every, self.parallel, self.ema, self.logger,
                                        extra_state=(lambda: {"repa": self.repa.state_dict()}) if self.repa is not None else None)
        self.checkpoints.last = self.start.checkpoint
        self.checkpoints.last_step = self.start.step if self.start.checkpoint else None
        self.evaluation = TrainingEvaluation(cfg, spec, self.parallel, self.ema, self.logger, self.run_dir)
        self.meter = Meter(self.logger, dist_info, cfg.train.global_batch_size, cfg.train.spike_factor)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.evaluated: dict[int, dict] = {}  # the latest evaluation, by step
        self.eval_seconds = 0.0  # spent in evaluations
        self.flops: list[tuple[int, int]] = []  # train.count_flops: (first step, FLOPs of each step from it on)
        self.flops_regime = None  # (loss, routed patch, pooling factor) the latest count was made with
        self.grad_norm = float("nan")

    def step(self, step: int) -> float:
        """One training step at ``step``: learning rate, the step's random stream, train_step, metrics. Returns the lr."""
        t = self.cfg.train
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_fn = self.loss_fn(step)
        routed = self.routing_until is None or step < self.routing_until
        if self.route_patch and step == self.routing_until:
            log.info("step %d: token routing off (train.routing.until); every token is trained from here", step)
        route_patch = self.route_patch if routed else 0
        downscale = self.lowres.factor_at(step) if self.lowres is not None else 1
        if self.lowres is not None and step == self.lowres.until:
            log.info("step %d: full resolution from here (train.lowres.until)", step)
        regime = (loss_fn, route_patch, downscale)
        restart = max((r for r in self.ema_restarts if r <= step), default=None)
        counting = t.get("count_flops") and (not self.flops or regime != self.flops_regime)
        with FlopCounterMode(display=False) if counting else contextlib.nullcontext() as counter:
            out = train_step(self.parallel, self.optimizer,
                             self.feed.micro_batches(step_generator(self.cfg.seed, self.dist_info.rank, step, self.dist_info.device),
                                                     route_patch, downscale),
                             t.grad_accum, grad_clip=t.grad_clip, forward_context=self.forward_context,
                             may_apply=lambda norm: self.guard.check(norm, step, self.checkpoints.last),
                             ema=self.ema, ema_decay=ema_decay_at(step, t.ema_decay, t.get("ema_warmup", True), restart),
                             objective=self.spec.objective, loss_fn=loss_fn)
            if self.repa is not None:
                self.repa.update(step, lr, t.grad_clip, out.applied)
        if counting:  # this rank's, from here until the step's loss, routing or resolution changes
            self.flops.append((step, counter.get_total_flops()))
            self.flops_regime = regime
            log.info("step %d: %.3g FLOPs per training step on this rank (forward, backward, update)", step, self.flops[-1][1])
        if not out.applied:
            self.logger.write(f"step {step}: non-finite loss or gradient, update skipped ({self.guard.skipped_total} so far)")
        self.meter.add(out.losses)
        self.grad_norm = out.grad_norm
        return lr

    def loss_fn(self, step: int):
        """The step's loss in place of the objective's plain one: distillation's, or with an alignment term; None: plain."""
        if self.distill is not None:
            return self.distill.loss
        if self.repa is not None:
            return self.repa.loss_at(step)
        return self.align.loss_at(step) if self.align is not None else None

    def report(self, step: int, lr: float) -> None:
        term = self.repa.logged_term() if self.repa is not None else None  # REPA's 1 - cos, apart from the loss it is in
        self.meter.report(step, lr=lr, grad_norm=self.grad_norm, skipped_steps=self.guard.skipped_total,
                          bad_samples=self.feed.bad_samples, **({"repa_term": term} if term is not None else {}),
                          show=("repa_term",) if term is not None else ())

    def save(self, step: int) -> None:
        self.checkpoints.save_once(step, self.optimizer, self.feed.batches_done, self.feed.positions)

    def between_steps(self, step: int, stop: StopRequest) -> None:
        """After a step before the last: the periodic checkpoint and evaluation, and a pre-emption signal."""
        t = self.cfg.train
        if self.guard.consecutive == 0 and t.checkpoint_every and step % t.checkpoint_every == 0:  # never mid non-finite streak
            self.save(step)
        if t.sample_every and step % t.sample_every == 0:
            self.evaluated = {step: self.evaluate(step)}
        self.stop_if_asked(step, stop)

    def evaluate(self, step: int) -> dict:
        start = time.time()
        result = self.evaluation.run(step)
        self.eval_seconds += time.time() - start
        return result

    def stop_if_asked(self, step: int, stop: StopRequest) -> None:
        """On a stop signal (any rank's): checkpoint what this run trained, exit 75 (run again to resume)."""
        if not stop.requested(self.dist_info.enabled):
            return
        if step > self.start.step:
            self.save(step)
            log.warning("stop signal: checkpoint of step %d saved; exiting with code %d (run again to resume)", step, PREEMPTED_EXIT_CODE)
        else:
            log.warning("stop signal before the first step: nothing to save; exiting with code %d (run again)", PREEMPTED_EXIT_CODE)
        self.logger.close()
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def finish(self, step: int, seconds: float) -> dict[str, Any]:
        """The final checkpoint (unless resumed at the end already) and evaluation, then the summary; the tracker closes last."""
        train_seconds = seconds - self.eval_seconds  # the loop's, without its evaluations
        if step > self.start.step:
            self.save(step)
        else:  # resumed a run that had already finished: nothing to train
            self.checkpoints.last = latest_checkpoint(self.run_dir / "checkpoints")
        result = self.evaluated[step] if step in self.evaluated else (self.evaluate(step) if self.cfg.train.sample_every else {})
        self.logger.close()
        summary = {
            "stage": self.cfg.stage.name,
            "step": step,
            "steps_this_run": step - self.start.step,
            "max_steps": self.cfg.train.max_steps,
            "images_per_step": self.cfg.train.global_batch_size,
            "seconds": round(seconds, 1),
            "train_seconds": round(train_seconds, 1),
            **({"flops_per_step": self.flops} if self.flops else {}),
            "final_loss": self.meter.last_loss,
            "skipped_steps": self.guard.skipped_total,
            "world_size": self.dist_info.world_size,
            "replica_divergence": self.parallel.check_replicas(step),
            **({"repa_projector_divergence": replica_divergence(self.repa.projector, self.dist_info)} if self.repa else {}),
            "first_batch_overlap": self.feed.first_batch_overlap,
            "checkpoint": str(self.checkpoints.last) if self.checkpoints.last else None,
            **{f"eval_{k}": v for k, v in result.items()},
        }
        if self.dist_info.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("done: %s", json.dumps(summary))
        return summary


def run(cfg: DictConfig, dist_info: DistInfo, stop: StopRequest, run_dir: Path) -> dict[str, Any]:
    """The loop: a step, its metrics, then (before the last) checkpoints, evaluations and signals."""
    r, t = Run(cfg, dist_info, run_dir), cfg.train
    step, t_start = r.start.step, time.time()
    until = t.max_steps if t.get("stop_after") is None else min(t.max_steps, t.stop_after)  # stop_after: pause, same schedule
    r.stop_if_asked(step, stop)  # a signal during start-up
    while step < until:
        lr = r.step(step)
        step += 1
        if step % t.log_every == 0 or step == t.max_steps:
            r.report(step, lr)
        if step < t.max_steps:
            r.between_steps(step, stop)
    return r.finish(step, time.time() - t_start)


def make_distillation(cfg: DictConfig, spec: setup.RunSpec, device):
    """The distillation loss of a train_distill.py run (training/distill.py), its teacher the init checkpoint; None otherwise."""
    d = cfg.train.get("distill")
    if not d or not d.enabled:
        return None
    from models.checkpoint import checkpoint_model, read_meta
    from training.distill import ConsistencyDistillation, DistillSettings

    teacher = checkpoint_model(cfg.stage.init_from, read_meta(cfg.stage.init_from)).to(device)
    settings = DistillSettings.from_config(d)
    log.info("distillation: teacher %s (frozen), %d-step grid, guidance w ~ U[%g, %g]", cfg.stage.init_from,
             settings.teacher_steps, settings.w_min, settings.w_max)
    return ConsistencyDistillation(teacher, spec.conditioning.null, settings, spec.shift, spec.model_config.guidance_embed)


def make_repa(cfg: DictConfig, spec: setup.RunSpec, model, routing, use_fsdp: bool, dist_info: DistInfo, start):
    """REPA's loss and projector (training/repa.py) for a run with ``train.repa.encoder``, the projector as a resumed
    run's training state (``start``) left it; None otherwise, or once the run is past ``until`` (no encoder is loaded)."""
    settings = setup.repa_spec(cfg, spec.model_config, routing, use_fsdp)
    if settings is None:
        return None
    if settings.until is not None and start.step >= settings.until:
        log.info("REPA: off since step %d (train.repa.until); the encoder is not loaded", settings.until)
        return None
    saved = start.repa
    from models.vision_encoder import VisionEncoder, VisionEncoderError
    from training.repa import RepresentationAlignment

    try:
        encoder = VisionEncoder(settings.encoder, settings.subfolder).to(dist_info.device)
    except VisionEncoderError as e:
        raise ConfigError(f"train.repa.encoder: {e}") from None
    repa = RepresentationAlignment(model, encoder, settings, spec.objective, spec.autoencoder.decode, spec.model_config.patch_size,
                                   spec.model_config.hidden_size, cfg.train.betas, cfg.seed, dist_info)
    if saved is not None:
        try:
            repa.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"cannot resume REPA's projector from the checkpoint: train.repa changed since it was saved "
                              f"({str(e).splitlines()[0]}). Resume with the same train.repa, or start a new run_dir from its "
                              "weights with stage.init_from") from None
    if spec.manifest.get("images"):
        source = "the shards' stored pixels"
    elif spec.manifest.get("autoencoder") in (None, "none"):
        source = "the pixel shards' images"
    else:
        source = (f"the latents decoded by {spec.manifest['autoencoder']} at every step (costly: data.prepare --keep-images "
                  "stores the pixels instead)")
    log.info("REPA: block %d's tokens through a %d-wide projector pulled toward %s's patch features (width %d, %dx%d patches, "
             "%s) of %s, weight %g%s%s", settings.block, settings.projector_dim, settings.encoder, encoder.width, encoder.patch_size,
             encoder.patch_size, encoder.normalization, source, settings.weight,
             f", until step {settings.until}" if settings.until is not None else "", "; projector resumed" if saved is not None else "")
    return repa


def freeze_base(model, cfg: DictConfig, lora: bool, use_fsdp: bool) -> None:
    """A ControlNet run (PixArt-δ) trains the copies and their projections; the base stays as it was."""
    if lora:
        raise ConfigError("train.lora with a ControlNet: the ControlNet's copies are trained whole and the base is frozen; "
                          "set train.lora.rank=0")
    if use_fsdp:
        raise ConfigError("train.parallel=fsdp with a ControlNet: the frozen base is not sharded apart from the copies here; "
                          "use train.parallel=ddp")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("controlnet."))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("ControlNet: %d of %d blocks copied, %.2fM trained parameters; the base (%.2fM) is frozen",
             model.config.control_blocks, model.config.depth, trained / 1e6, (count_parameters(model) - trained) / 1e6)


def run_meta(cfg: DictConfig, spec: setup.RunSpec) -> dict:
    """What every checkpoint of this run records beside its weights (models/checkpoint.py)."""
    return checkpoint_meta(
        stage=cfg.stage.name, stage_index=cfg.stage.index, family=cfg.model.family, preset=cfg.model.preset,
        model_config=asdict(spec.model_config),
        autoencoder={"name": cfg.data.autoencoder, "subfolder": cfg.data.autoencoder_subfolder,
                     "scaling_factor": float(spec.manifest["scaling_factor"]), "shift_factor": float(spec.manifest["shift_factor"])},
        conditioning=spec.conditioning.meta(),
        sampling={"shift": float(spec.shift), **OmegaConf.to_container(cfg.train.sample)},
        objective=spec.objective.to_meta(),
        data={"path": str(spec.data_path), "name": cfg.data.name},
    )


def log_config_changes(run_dir: Path, config_yaml: str) -> None:
    """Resuming with changed settings is allowed (model changes are refused elsewhere); say what changed."""
    old_path = run_dir / "config.yaml"
    if not old_path.is_file():
        return
    flat = lambda c: dict(_flatten(OmegaConf.to_container(OmegaConf.create(c))))  # noqa: E731
    old, new = flat(old_path.read_text()), flat(config_yaml)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            log.info("config change since the last run: %s: %r -> %r", key, old.get(key), new.get(key))


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
