import pytest
import torch

from models.presets import build_model, model_config
from models.reparam import ccdit_to_mmdit


def _trained_like_ccdit(seed=0):
    """A ccDiT with every weight non-trivial (as after training): adaLN and output no longer zero."""
    torch.manual_seed(seed)
    model = build_model("ccdit", model_config("ccdit", "tiny", input_size=8, in_channels=3, num_classes=5))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("t_ref", [0.5, 0.8])
def test_1to2_is_exact_at_the_reference_time_for_any_text(t_ref):
    src = _trained_like_ccdit()
    dst, _ = ccdit_to_mmdit(src, caption_channels=7, t_ref=t_ref)
    x = torch.randn(4, 3, 8, 8)
    t = torch.full((4,), t_ref)
    ref = src(x, t, torch.full((4,), src.null_class))
    for text in (torch.randn(4, 6, 7), torch.zeros(4, 1, 7), 10 * torch.randn(4, 3, 7)):
        assert _rel(dst(x, t, text), ref) <= 1e-5


def test_1to2_error_away_from_the_reference_time_is_bounded():
    src = _trained_like_ccdit()
    dst, _ = ccdit_to_mmdit(src, caption_channels=7, t_ref=0.5)
    x = torch.randn(8, 3, 8, 8)
    errors = {}
    for tv in (0.1, 0.3, 0.499, 0.501, 0.7, 0.9):
        t = torch.full((8,), tv)
        errors[tv] = _rel(dst(x, t, torch.randn(8, 2, 7)), src(x, t, torch.full((8,), src.null_class)))
    print("relative error of mmDiT vs ccDiT (null class) by t:", {k: round(v, 4) for k, v in errors.items()})
    # The fold is exact only at t_ref: t enters through a sinusoid of t * 1000, so the blocks' modulation
    # moves quickly with t. Measured on the demo's final stage-1 checkpoint (step 3500): 0.014 at
    # t_ref +- 0.01, 0.10 at +- 0.1, 0.42 at t = 0.05 and 0.79 at t = 0.95. Here, on a randomly perturbed tiny model:
    assert max(errors.values()) < 0.3, errors
    assert errors[0.499] < 0.05 and errors[0.501] < 0.05, errors  # continuous in t: small next to t_ref


def test_1to2_leaves_no_shared_parameter_at_its_fresh_init():
    src = _trained_like_ccdit()
    dst, report = ccdit_to_mmdit(src, caption_channels=7)
    torch.manual_seed(0)
    fresh = type(dst)(dst.config).state_dict()
    shared = set(src.state_dict()) & set(dst.state_dict())
    assert shared, "the models must share parameter names"
    for name in shared:
        assert not torch.equal(dst.state_dict()[name], fresh[name]), f"{name} left at its fresh initialization"
        assert name in report["copied"] or name in report["folded"]
    # the only parameters not carried over are the text path's
    assert report["new"] and all(".cross_attn." in n or n.startswith("y_embedder.") for n in report["new"])
    assert all(torch.equal(dst.state_dict()[f"blocks.{i}.cross_attn.to_out.weight"], torch.zeros(32, 32)) for i in range(2))


def test_reparameterize_cli_writes_an_init_checkpoint(tmp_path, shapes_dir):
    import json
    import pickle

    from conftest import compose, tiny_overrides
    from inference.pipeline import load_model
    from reparameterize import main as reparam_main
    from models.checkpoint import read_meta
    from training.trainer import train

    ckpt = train(compose(tiny_overrides(tmp_path, shapes_dir)))["checkpoint"]
    report = reparam_main([ckpt, str(tmp_path / "init"), "--caption-channels", "16"])
    assert report["relative_error_by_t"]["0.5"] <= 1e-5
    meta = read_meta(tmp_path / "init")
    assert meta["family"] == "mmdit" and meta["stage"] == "stage2" and meta["init"]["source_step"] == 6
    model, _, _ = load_model(tmp_path / "init")  # it is a loadable, self-describing checkpoint
    assert model.config.caption_channels == 16 and json.loads((tmp_path / "init" / "report.json").read_text())["new"]
    # wrong inputs: an mmDiT checkpoint where a stage-1 one is expected, a stage-2 one without the new
    # resolution, a missing width, an existing output
    with pytest.raises(SystemExit, match="1to2 needs a stage-1 ccDiT checkpoint"):
        reparam_main([str(tmp_path / "init"), str(tmp_path / "x"), "--transition", "1to2", "--caption-channels", "16"])
    with pytest.raises(SystemExit, match="2to3 needs --image-size"):
        reparam_main([str(tmp_path / "init"), str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="needs the stage-2 text width: --data SHARDS"):
        reparam_main([ckpt, str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="exists; pass --force"):
        reparam_main([ckpt, str(tmp_path / "init"), "--caption-channels", "16"])

    # a pickle payload in place of the weights never runs
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    from pathlib import Path

    (Path(ckpt) / "ema.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        reparam_main([ckpt, str(tmp_path / "z"), "--caption-channels", "16"])
    assert not (tmp_path / "pwned").exists()
