"""The trainer's side of the data: a loader over the stage's shards that resumes at the exact
batch, counts what it read and the bad samples it skipped, checks that DDP ranks read different
samples, and turns each batch into the flow's inputs (training/step.py ``MicroBatch``)."""
from __future__ import annotations

from typing import Iterator

import torch

from data.shards import SampleCheck, ShardStream, is_bucketed
from inference.conditioning import ClassConditioning
from training.distributed import DistInfo, shared_items
from training.setup import RunSpec
from training.step import MicroBatch, token_pixels


class Feed:
    def __init__(self, cfg, spec: RunSpec, dist_info: DistInfo, batches_done: int, positions: dict | None = None):
        self.spec, self.dist_info, self.device = spec, dist_info, dist_info.device
        stream = ShardStream(spec.data_path, spec.micro_batch, dist_info.rank, dist_info.world_size, cfg.seed, cfg.data.shuffle_buffer,
                             batches_done, max_bad_fraction=float(cfg.data.get("max_bad_fraction", 0.01)),
                             text_names=spec.conditioning.stored_captions(), start_positions=positions, check=sample_check(spec),
                             interleave=int(cfg.data.interleave))
        workers = cfg.data.num_workers if cfg.data.get("num_workers") is not None else default_workers(dist_info)
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                  pin_memory=self.device.type == "cuda")
        self._batches = iter(self.loader)
        self.batches_done, self.bad_samples, self.first_batch_overlap = batches_done, 0, None
        self.positions = dict(positions or {})  # {reader role: samples read}: where the stream resumes
        self.scale, self.shift = float(spec.manifest["scaling_factor"]), float(spec.manifest["shift_factor"])
        t = cfg.train.timestep
        self.timesteps = (t.logit_mean, t.logit_std, spec.shift)
        self.cond_dropout = cfg.train.cond_dropout
        self.extra_draws = 0  # uniform numbers per sample a distillation loss draws (training/distill.py)
        self.masking = None  # a masked run's Routing (models/routing.py): a routed step's loss counts only its kept tokens
        self.images = False  # hand the shards' stored pixels to the step (REPA's encoder input), when they have them

    def micro_batches(self, gen: torch.Generator, route_patch: int = 0, downscale: int = 1) -> Iterator[MicroBatch]:
        """The next batches as flow inputs, their random draws (condition dropout, t, noise) from ``gen``;
        with ``route_patch`` (a routed step's patch size) also one route score per image token
        (models/routing.py), and under ``masking`` the tokens its loss counts; with ``downscale`` > 1
        (train.lowres's warm-up) the latents average-pooled by it first."""
        while True:
            batch = next(self._batches)
            self.batches_done += 1
            self.bad_samples = max(self.bad_samples, int(batch.get("bad_samples", 0)))
            if "position" in batch:
                role, read = batch["position"]
                self.positions[int(role)] = int(read)
            if self.first_batch_overlap is None:
                self.first_batch_overlap = shared_items(batch["keys"], self.dist_info)  # ranks must read different samples
                if self.first_batch_overlap:
                    raise RuntimeError(f"DDP ranks read {self.first_batch_overlap} identical samples in their first batch")
            x0 = (batch["latent"].to(self.device, non_blocking=True) - self.shift) * self.scale  # (N, C, H, W) normalized latents
            if downscale > 1:  # the pixels, or about the latents, of a smaller image
                x0 = torch.nn.functional.avg_pool2d(x0, downscale)
            cond = self.spec.conditioning.from_batch(batch, gen, self.cond_dropout, self.device)  # with CFG dropout to null
            mb = MicroBatch.draw(x0, cond, *self.timesteps, gen, self.spec.objective, self.extra_draws,
                                 tokens(x0, route_patch) if route_patch else 0)
            if self.masking is not None and mb.route is not None:  # the tokens the model keeps: the same scores, the same rule
                mb.loss_weight = token_pixels(self.masking.kept_mask(mb.route), route_patch, x0.shape)
            if self.images and "image" in batch:
                mb.images = batch["image"].to(self.device, non_blocking=True).float() / 127.5 - 1.0
            yield mb


def tokens(latents: torch.Tensor, patch_size: int) -> int:
    """Image tokens of a (N, C, H, W) batch (bucketed data: its bucket's)."""
    return (latents.shape[-2] // patch_size) * (latents.shape[-1] // patch_size)


def default_workers(dist_info: DistInfo) -> int:
    """data.num_workers=null: the cores this process may use beyond its own, split among the ranks on
    this machine, at most 8 (a 2-core machine gets 1 worker, a 16-core 8-GPU node 1 per rank)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, cores // max(local, 1) - 1))


def sample_check(spec: RunSpec) -> SampleCheck:
    """What each sample must be for this run: its latent shape (per bucket for bucketed data), a label
    in range for class conditioning, a stored caption embedding for precomputed text, finite values."""
    c = spec.latent_shape[0]
    cond = spec.conditioning
    return SampleCheck(latent_shape=None if is_bucketed(spec.manifest) else spec.latent_shape, channels=c, downsample=spec.autoencoder.downsample,
                       num_classes=cond.num_classes if isinstance(cond, ClassConditioning) else None,
                       text=bool(cond.stored_captions()), control=cond.stored_control())
