"""DDP on CPU with gloo: a torchrun launch as users do it, and gradient correctness per linear backend."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_overrides


def test_two_process_ddp_trains_with_identical_replicas(tmp_path, shapes_dir):
    overrides = tiny_overrides(tmp_path, shapes_dir, **{"train.global_batch_size": 16, "train.max_steps": 4})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_stage1.py"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary_path = tmp_path / "run" / "summary.json"
    # gloo can abort a rank while tearing down after a finished run (ENVIRONMENT.md); what counts is
    # that the run finished: the summary is written only after the last checkpoint and the checks.
    assert summary_path.exists(), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    assert summary["replica_divergence"] == 0.0  # DDP keeps the replicas bit-identical
    assert summary["first_batch_overlap"] == 0  # each rank reads different samples
    assert "global batch 16 = 2 ranks x 8 x 1 accum" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_0000004" / "model.safetensors").exists()


@pytest.mark.parametrize("entry", ["controlnet", "distill"])
def test_two_process_ddp_trains_a_controlnet_and_a_student(tmp_path, control_dir, entry):
    """The runs beside the curriculum under torchrun: a frozen base (ControlNet) or a frozen teacher (distillation)."""
    from conftest import compose, stage2_overrides
    from safetensors.torch import load_file

    from training.trainer import train

    base = train(compose(stage2_overrides(tmp_path / "base", control_dir, **{"train.max_steps": 2}), "stage2"))["checkpoint"]
    experiment = {"controlnet": {"experiment": "demo_controlnet", "model.control_blocks": 1},
                  "distill": {"experiment": "demo_distill", "train.distill.teacher_steps": 8}}[entry]
    overrides = stage2_overrides(tmp_path, control_dir, **{**experiment, "stage.init_from": base, "train.global_batch_size": 16,
                                                            "train.max_steps": 2, "train.warmup_steps": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / f"train_{entry}.py"),
           *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    summary_path = tmp_path / "run" / "summary.json"
    assert summary_path.exists(), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2 and summary["replica_divergence"] == 0.0 and summary["first_batch_overlap"] == 0
    saved, before = load_file(tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors"), load_file(
        os.path.join(base, "ema.safetensors"))
    if entry == "controlnet":  # the base is frozen
        assert all(torch.equal(saved[k], before[k]) for k in before)
    new = "controlnet.after_proj.0.weight" if entry == "controlnet" else "guidance_embedder.linear_2.weight"
    assert saved[new].abs().sum() > 0  # the new part trained from its zero start


def _ddp_one_step(rank, world, init_file, backend, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flow.rectified_flow import flow_loss, interpolate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, batch = _model_and_batch(backend)
    x0, noise, t, y = (b.chunk(world)[rank] for b in batch)
    ddp = DDP(model)
    flow_loss(ddp(interpolate(x0, noise, t), t, y), x0, noise).mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    if rank == 0:
        _save(model, out_dir / f"{backend}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _save(model, path) -> None:
    """The weights, atomically: the file exists only once it is whole."""
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def _spawn(fn, args: tuple, results: list) -> None:
    """Two gloo processes running ``fn``. gloo can abort a rank at shutdown (after its work, ENVIRONMENT.md):
    that counts as a failure only when a result file the ranks write is missing."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(fn, args=args, nprocs=2, join=True)
    except mp.ProcessExitedException:
        if not all(os.path.exists(p) for p in results):
            raise


def _model_and_batch(backend):
    from models.linear import convert
    from models.presets import build_model, model_config

    torch.manual_seed(0)
    model = convert(build_model("ccdit", model_config("ccdit", "tiny", input_size=8, in_channels=3, num_classes=4)), backend)
    for p in model.parameters():  # leave the zero init so every weight gets a gradient
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    # 8 samples x 16 tokens: each rank's 64 tokens are whole MXFP8 blocks of 32, as in the full batch
    batch = (torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g),
             torch.rand(8, generator=g), torch.randint(0, 5, (8,), generator=g))
    return model, batch


@pytest.mark.parametrize("backend", ["torch", "mxfp8_emulated"])
def test_ddp_step_equals_single_process_on_the_whole_batch(tmp_path, backend):
    """DDP's all-reduced gradient must be the whole batch's: replicas on half batches, after one
    step, equal one process on the concatenated batch (the FP8 emulation included)."""
    from flow.rectified_flow import flow_loss, interpolate

    _spawn(_ddp_one_step, (2, str(tmp_path / "rdzv"), backend, tmp_path), [tmp_path / f"{backend}.pt"])
    ddp_weights = torch.load(tmp_path / f"{backend}.pt", weights_only=True)
    model, (x0, noise, t, y) = _model_and_batch(backend)
    flow_loss(model(interpolate(x0, noise, t), t, y), x0, noise).mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    moved = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, _model_and_batch(backend)[0].state_dict()[k]))
    assert moved > 10  # the step changed the weights, so the comparison means something


def _ddp_fused_step(rank, world, init_file, out_dir, reduce):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flow.rectified_flow import flow_loss, interpolate
    from training import fused_wgrad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, batch = _model_and_batch("mxfp8_emulated")
    owned = fused_wgrad.enable(model)
    fused_wgrad.exclude_from_ddp(model, owned)
    x0, noise, t, y = (b.chunk(world)[rank] for b in batch)
    ddp = DDP(model)
    flow_loss(ddp(interpolate(x0, noise, t), t, y), x0, noise).mean().backward()
    if reduce:
        fused_wgrad.reduce_and_publish(owned, world)
    else:  # what a trainer that trusts DDP with fused wgrad does: each rank keeps its own gradient
        for _, p in owned:
            p.grad = p.main_grad.clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    _save(model, out_dir / f"fused_{reduce}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_fused_wgrad_protocol_under_ddp_equals_single_process(tmp_path):
    """Fused wgrad accumulation (gradients in main_grad, invisible to DDP) + our all-reduce: the
    2-process step equals one process on the whole batch; without the all-reduce, replicas drift."""
    from flow.rectified_flow import flow_loss, interpolate
    from training import fused_wgrad

    for reduce in (True, False):
        (tmp_path / f"rdzv{reduce}").unlink(missing_ok=True)
        _spawn(_ddp_fused_step, (2, str(tmp_path / f"rdzv{reduce}"), tmp_path, reduce),
               [tmp_path / f"fused_{reduce}_rank{r}.pt" for r in (0, 1)])
    model, (x0, noise, t, y) = _model_and_batch("mxfp8_emulated")
    owned = fused_wgrad.enable(model)
    flow_loss(model(interpolate(x0, noise, t), t, y), x0, noise).mean().backward()
    assert all(p.grad is None and p.main_grad.abs().sum() > 0 for _, p in owned)  # the wgrad went to main_grad
    fused_wgrad.reduce_and_publish(owned, 1)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    good = torch.load(tmp_path / "fused_True_rank0.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(good[k], v, rtol=1e-5, atol=1e-6, msg=k)
    r0, r1 = (torch.load(tmp_path / f"fused_False_rank{r}.pt", weights_only=True) for r in (0, 1))
    drift = max((r0[name] - r1[name]).abs().max().item() for name, _ in owned)
    assert drift > 1e-4  # the bug this protocol prevents: unreduced fused gradients split the replicas


def test_fused_wgrad_in_the_trainer(tmp_path, shapes_dir):
    """precision.fuse_wgrad=true: one process trains to the same weights as without it, and a
    2-process DDP run keeps the replicas identical (the trainer's check at every save)."""
    from models.checkpoint import load_weights
    from training.trainer import train

    from conftest import compose

    extra = {"precision": "mxfp8_emulated", "train.max_steps": 4}
    plain = train(compose(tiny_overrides(tmp_path / "plain", shapes_dir, **extra)))
    fused = train(compose(tiny_overrides(tmp_path / "fused", shapes_dir, **extra, **{"precision.fuse_wgrad": True})))
    a, b = load_weights(plain["checkpoint"]), load_weights(fused["checkpoint"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    overrides = tiny_overrides(tmp_path / "ddp", shapes_dir, **extra, **{"precision.fuse_wgrad": True, "train.global_batch_size": 16})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train_stage1.py"), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    summary = tmp_path / "ddp" / "run" / "summary.json"
    assert summary.exists(), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert json.loads(summary.read_text())["replica_divergence"] == 0.0
