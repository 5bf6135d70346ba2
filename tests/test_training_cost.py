"""Cheaper training: token routing (models/routing.py), the low-resolution warm-up (train.lowres) and
self-alignment (training/alignment.py)."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, stage2_overrides, tiny_overrides
from flow.objectives import FLOW
from inference.pipeline import call_model
from models.ccdit import CCDiT, CCDiTConfig
from models.checkpoint import latest_checkpoint
from models.linear import convert
from models.mmdit import MMDiT, MMDiTConfig
from models.routing import RoutedSpan, Routing, gather_tokens, scatter_tokens
from training.alignment import AlignSettings, SelfAlignment, alignment_loss
from training.config import ConfigError
from training.step import MicroBatch, token_pixels
from training.trainer import train

ROUTING = Routing(0.5, 1, 3)


def _models():
    """Both families (and both mmDiT blocks), 4 blocks, random weights (no closed gates), 16 tokens."""
    torch.manual_seed(0)
    models = {
        "ccdit": CCDiT(CCDiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=4)),
        "pixart": MMDiT(MMDiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=4, num_heads=2,
                                    caption_channels=16, block="pixart", micro_conditions=True)),
        "joint": MMDiT(MMDiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=4, num_heads=2,
                                   caption_channels=16, block="joint")),
    }
    for m in models.values():
        for p in m.parameters():
            p.data.normal_(0, 0.1)
    return models


def _inputs(name, n=3):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(n, 3, 8, 8, generator=g), torch.rand(n, generator=g)
    if name == "ccdit":
        return x, t, {"class_labels": torch.tensor([0, 2, 4])[:n]}  # 4: the null class
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[1, 2:] = False  # one padded caption: the text mask must keep working inside the span
    return x, t, {"encoder_hidden_states": torch.randn(n, 5, 16, generator=g), "encoder_attention_mask": mask}


def _plain_forward(model, x, t, cond):
    """The block loop written out, as before routing existed: the reference for 'routing off changes nothing'."""
    block_inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: block_inputs.append(a[0].clone())) for b in model.blocks]
    try:
        return model(x, t, **cond), block_inputs
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["ccdit", "pixart", "joint"])
def test_without_routing_the_model_is_unchanged_in_outputs_and_gradients(name):
    model = _models()[name].train()
    x, t, cond = _inputs(name)
    scores = torch.rand(3, 16)

    def run(**kw):
        model.zero_grad()
        out = model(x, t, **cond, **kw)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref, ref_grads = run()
    for routing, kw, training in [(None, {"route_scores": scores}, True),  # scores given, routing off
                                  (ROUTING, {}, True),  # routing set, no scores (sampling's call)
                                  (ROUTING, {"route_scores": scores}, False)]:  # eval mode: every token
        model.routing = routing
        model.train(training)
        out, grads = run(**kw)
        assert torch.equal(out, ref)
        assert len(grads) == len(ref_grads) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    model.routing = None


def test_gather_then_scatter_puts_every_token_back_in_its_place():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 8, generator=g)
    for _ in range(5):
        index = ROUTING.kept(torch.rand(4, 16, generator=g))  # (N, 8): a random half per sample
        assert index.shape == (4, 8) and torch.equal(index, index.sort(dim=1).values)
        kept = gather_tokens(x, index)
        for n in range(4):
            assert torch.equal(kept[n], x[n, index[n]])
        changed = scatter_tokens(x, kept * 10, index)  # the span's output for the kept, the rest untouched
        for n in range(4):
            routed = torch.ones(16, dtype=torch.bool)
            routed[index[n]] = False
            assert torch.equal(changed[n, index[n]], x[n, index[n]] * 10)
            assert torch.equal(changed[n, routed], x[n, routed])
        assert torch.equal(scatter_tokens(x, kept, index), x)
        # a permutation of the token order permutes which tokens are kept, and nothing else
        perm = torch.randperm(16, generator=g)
        scores = torch.rand(4, 16, generator=g)
        kept_p = ROUTING.kept(scores[:, perm])
        assert torch.equal(perm[kept_p].sort(dim=1).values, ROUTING.kept(scores))


@pytest.mark.parametrize("name", ["ccdit", "pixart", "joint"])
def test_routed_tokens_skip_the_span_and_come_back_in_their_places(name):
    model = _models()[name].train()
    model.routing = ROUTING
    x, t, cond = _inputs(name)
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    index = ROUTING.kept(scores)
    routed_out, seen = _plain_forward(model, x, t, {**cond, "route_scores": scores})
    assert [s.shape[1] for s in seen] == [16, 8, 8, 16]  # blocks 1-2 see the kept half, block 3 every token again
    # block 3's input: the routed tokens exactly as they entered block 1, the kept ones as the span left them
    entering = _span_input(model, x, t, cond)  # block 0 is the same with and without routing
    for n in range(3):
        routed = torch.ones(16, dtype=torch.bool)
        routed[index[n]] = False
        assert torch.equal(seen[1][n], entering[n, index[n]])
        assert torch.equal(seen[3][n, routed], entering[n, routed])
        assert not torch.equal(seen[3][n, index[n]], entering[n, index[n]])
    assert routed_out.shape == x.shape and torch.isfinite(routed_out).all()
    # with the span's blocks closed (identity), routing changes nothing at all
    for block in model.blocks[1:3]:
        _close(block)
    model.routing = None
    plain = model(x, t, **cond)
    model.routing = ROUTING
    torch.testing.assert_close(model(x, t, **cond, route_scores=scores), plain, rtol=0, atol=1e-6)
    model.routing = None


def _span_input(model, x, t, cond):
    """The tokens entering block 1 (the span's first) without routing."""
    model.routing = None
    _, seen = _plain_forward(model, x, t, cond)
    model.routing = ROUTING
    return seen[1]


def _close(block):
    """Make a block the identity: its residual branches' outputs zero (a joint block's text stream too, which
    inside the span attends to the kept image tokens only)."""
    if hasattr(block, "scale_shift_table"):  # PixArt: zero the attention and MLP outputs
        for lin in (block.attn.to_out, block.cross_attn.to_out, block.mlp.fc2):
            lin.weight.data.zero_()
            lin.bias.data.zero_()
    else:  # adaLN-Zero: gates zero
        for name in ("adaLN_modulation", "context_adaLN_modulation"):
            if hasattr(block, name):
                getattr(block, name)[-1].weight.data.zero_()
                getattr(block, name)[-1].bias.data.zero_()


def test_routing_works_through_the_fp8_converter():
    torch.manual_seed(0)  # MXFP8 blocks of 32: every converted projection a multiple of it
    model = convert(MMDiT(MMDiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=4, num_heads=2,
                                      caption_channels=16, block="pixart", micro_conditions=True)), "mxfp8_emulated").train()
    model.routing = ROUTING
    x, t, cond = _inputs("pixart")
    out = model(x, t, **cond, route_scores=torch.rand(3, 16))
    out.square().mean().backward()
    assert torch.isfinite(out).all() and all(p.grad is not None for p in model.blocks[1].parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["ccdit", "pixart", "joint"])
def test_masked_tokens_are_dropped_for_good(name):
    """Deferred masking from block 0: a kept token's output does not depend on the dropped tokens'
    pixels at all, the output is zero at the dropped tokens, and the dropped pixels get no gradient."""
    model = _models()[name].train()
    model.routing = Routing(0.75, 0, 4, mask=True)
    x, t, cond = _inputs(name)
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    keep = token_pixels(model.routing.kept_mask(scores), 2, x.shape).bool().expand_as(x)  # (N, C, H, W)
    assert int(model.routing.kept_mask(scores).sum()) == 3 * 4
    x = x.clone().requires_grad_(True)
    out = model(x, t, **cond, route_scores=scores)
    out.square().sum().backward()
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep])) and out[keep].abs().min() > 0
    assert torch.equal(x.grad[~keep], torch.zeros_like(x.grad[~keep])) and x.grad[keep].abs().sum() > 0
    other = torch.where(keep, x.detach(), torch.randn_like(x))  # new pixels wherever a token is dropped
    torch.testing.assert_close(model(other, t, **cond, route_scores=scores)[keep], out[keep].detach(), rtol=0, atol=1e-6)
    # a patch mixer (block 0 sees every token): the dropped pixels reach the kept tokens through it
    model.routing = Routing(0.75, 1, 4, mask=True)
    assert not torch.allclose(model(other, t, **cond, route_scores=scores)[keep], model(x, t, **cond, route_scores=scores)[keep])
    model.routing = None


def test_a_masked_loss_counts_only_the_kept_tokens():
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    tokens = torch.zeros(2, 16, dtype=torch.bool)
    tokens[0, [0, 5]] = True  # sample 0: patches (0, 0) and (1, 1) of the 4x4 grid of 2x2 patches
    tokens[1, 15] = True  # sample 1: the last patch
    weight = token_pixels(tokens, 2, x0.shape)
    assert weight.shape == (2, 1, 8, 8) and weight[0].sum() == 8 and weight[1, 0, 6:, 6:].sum() == 4
    err = (pred - (noise - x0)).square()
    expected = torch.stack([torch.cat([err[0, :, 0:2, 0:2].flatten(), err[0, :, 2:4, 2:4].flatten()]).mean(),
                            err[1, :, 6:, 6:].mean()])
    torch.testing.assert_close(FLOW.loss(pred, x0, noise, weight), expected)
    torch.testing.assert_close(FLOW.loss(pred, x0, noise, torch.ones(2, 1, 8, 8)), FLOW.loss(pred, x0, noise))
    with pytest.raises(ValueError, match="15 tokens for a 8x8 latent in 2x2 patches"):
        token_pixels(torch.ones(2, 15, dtype=torch.bool), 2, x0.shape)
    # a 2:1 bucket: the token grid is 2 high and 4 wide, row by row, as the models lay it out
    wide = token_pixels(torch.tensor([[True] + [False] * 7]), 2, torch.Size((1, 3, 4, 8)))
    assert wide[0, 0, :2, :2].sum() == 4 and wide.sum() == 4


def test_a_masked_run_feeds_the_loss_the_tokens_its_model_keeps(tmp_path, shapes_dir):
    """Through the trainer's own parts: the feed's loss weight is the model's kept tokens, so the
    loss does not change when the dropped pixels of the image or the noise do."""
    from training import setup
    from training.distributed import setup as setup_processes
    from training.step import objective_loss, step_generator
    from training.trainer import Run

    cfg = compose(tiny_overrides(tmp_path, shapes_dir, **{"model.depth": 4, **SWITCHES["masking"]}))
    run_dir = setup.run_directory(cfg)
    run_dir.mkdir(parents=True)
    r = Run(cfg, setup_processes(), run_dir)
    model = r.parallel.model
    mb = next(r.feed.micro_batches(step_generator(0, 0, 0, torch.device("cpu")), r.route_patch))
    n, _, h, w = mb.x0.shape
    kept = model.routing.kept_mask(mb.route)  # (N, T): a quarter of the tokens
    assert mb.loss_weight.shape == (n, 1, h, w) and int(kept.sum()) == n * kept.shape[1] // 4
    torch.testing.assert_close(mb.loss_weight, token_pixels(kept, model.config.patch_size, mb.x0.shape))
    loss = objective_loss(model, mb)
    dropped = mb.loss_weight == 0
    other = MicroBatch(torch.where(dropped, torch.randn_like(mb.x0), mb.x0), mb.cond, mb.t,
                       torch.where(dropped, torch.randn_like(mb.noise), mb.noise), route=mb.route, loss_weight=mb.loss_weight)
    torch.testing.assert_close(objective_loss(model, other), loss, rtol=0, atol=1e-6)
    plain = MicroBatch(other.x0, mb.cond, mb.t, other.noise, route=mb.route)  # the same step counting every pixel
    assert not torch.allclose(objective_loss(model, plain), objective_loss(model, MicroBatch(mb.x0, mb.cond, mb.t, mb.noise, route=mb.route)))


def test_routing_settings_are_checked():
    with pytest.raises(ValueError, match="0 < ratio < 1"):
        Routing(1.0, 1, 3).check(4)
    with pytest.raises(ValueError, match="start < end <= depth"):
        Routing(0.5, 3, 3).check(4)
    assert Routing(0.5, 1, 3).kept_count(16) == 8 and Routing(0.99, 1, 3).kept_count(16) == 1
    with pytest.raises(ValueError, match="end=3 must be the depth"):
        Routing(0.5, 1, 3, mask=True).check(4)


def test_a_draw_without_routing_takes_nothing_from_the_stream():
    x0 = torch.randn(4, 3, 8, 8)
    a = MicroBatch.draw(x0, {}, gen=torch.Generator().manual_seed(0))
    b = MicroBatch.draw(x0, {}, gen=torch.Generator().manual_seed(0), route_tokens=16)
    assert torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise) and a.route is None and b.route.shape == (4, 16)
    assert a.model_cond == {} and set(b.model_cond) == {"route_scores"}


def test_alignment_loss_is_zero_where_the_features_agree():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, 32, generator=g)
    assert alignment_loss(h, h).abs().max() < 1e-6
    assert alignment_loss(h, 3 * h).abs().max() < 1e-6  # direction, not length
    torch.testing.assert_close(alignment_loss(h, -h), torch.full((2,), 2.0))
    other = torch.randn(2, 16, 32, generator=g)
    assert (alignment_loss(h, other) > 0.5).all()


def test_self_alignment_adds_its_term_and_the_teacher_stops_at_its_block():
    model = _models()["ccdit"].train()
    ema = _models()["ccdit"].eval()  # same seed: the same weights
    settings = AlignSettings(weight=0.5, student_block=1, teacher_block=2, gap=0.0, until=10)
    align = SelfAlignment(model, ema, settings, FLOW)
    calls = []
    ema.blocks[3].register_forward_pre_hook(lambda m, a: calls.append(1))
    x, t, cond = _inputs("ccdit")
    mb = MicroBatch(x, cond, t, torch.randn_like(x))
    loss = align.loss(model, ema, mb)
    assert calls == []  # the EMA's blocks after the teacher block never ran
    plain = FLOW.loss(call_model(model, FLOW.noisy(x, mb.noise, t), t, cond), x, mb.noise)
    _, seen = _plain_forward(model, FLOW.noisy(x, mb.noise, t), t, cond)
    with torch.no_grad():
        _, seen_ema = _plain_forward(ema, FLOW.noisy(x, mb.noise, t), t, cond)
    torch.testing.assert_close(loss, plain + 0.5 * alignment_loss(seen[2], seen_ema[3]))
    assert align.loss_at(9) is not None and align.loss_at(10) is None  # switched off at `until`
    assert AlignSettings(weight=0.0).weight == 0 and SelfAlignment(model, ema, AlignSettings(), FLOW).loss_at(0) is None


SWITCHES = {
    "routing": {"train.routing.ratio": 0.5, "train.routing.start": 1, "train.routing.end": 3},
    "align": {"train.align.weight": 0.5, "train.align.student_block": 0, "train.align.teacher_block": 2, "train.align.until": 4},
    "routing_until": {"train.routing.ratio": 0.5, "train.routing.start": 1, "train.routing.end": 3, "train.routing.until": 4},
    "masking": {"train.routing.ratio": 0.75, "train.routing.start": 1, "train.routing.mode": "mask"},
    "masking_until": {"train.routing.ratio": 0.75, "train.routing.start": 1, "train.routing.mode": "mask", "train.routing.until": 4,
                      "train.routing.restart_ema": True},
    "lowres": {"train.lowres.factor": 2, "train.lowres.until": 4},
    "both": {"train.routing.ratio": 0.5, "train.routing.start": 1, "train.routing.end": 3, "train.align.weight": 0.5,
             "train.align.student_block": 0, "train.align.teacher_block": 2},
}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_resume_is_exact_with_each_switch_on(tmp_path, shapes_dir, switch):
    extra = {"model.depth": 4, "train.checkpoint_every": 100, **SWITCHES[switch]}
    full = train(compose(tiny_overrides(tmp_path / "a", shapes_dir, **extra, **{"train.count_flops": True})))
    train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **{**extra, "train.max_steps": 3})))
    resumed = train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **extra)))
    assert resumed["steps_this_run"] == 3
    a, b = (load_file(latest_checkpoint(tmp_path / r / "run" / "checkpoints") / "model.safetensors") for r in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    plain = train(compose(tiny_overrides(tmp_path / "c", shapes_dir, **{"model.depth": 4, "train.count_flops": True})))
    pa = load_file(latest_checkpoint(tmp_path / "c" / "run" / "checkpoints") / "model.safetensors")
    assert any(not torch.equal(a[k], pa[k]) for k in a)  # the switch changed the training
    (_, plain_flops), = plain["flops_per_step"]
    if switch == "routing":  # routed tokens do no work in the span: fewer FLOPs than the plain step
        assert full["flops_per_step"][0][1] < 0.9 * plain_flops
    if switch == "masking":  # 3 of 4 blocks and the final layer on a quarter of the tokens
        assert full["flops_per_step"][0][1] < 0.6 * plain_flops
    if switch == "align":  # the teacher's forward costs, until the term is switched off at step 4
        assert [s for s, _ in full["flops_per_step"]] == [0, 4]
        assert full["flops_per_step"][0][1] > plain_flops and full["flops_per_step"][1][1] == plain_flops
    if switch == "lowres":  # a quarter of the tokens before step 4, the full grid from it on
        assert [s for s, _ in full["flops_per_step"]] == [0, 4]
        assert full["flops_per_step"][0][1] < 0.35 * plain_flops and full["flops_per_step"][1][1] == plain_flops
    if switch in ("routing_until", "masking_until"):  # routed steps before step 4, plain ones (every token) from it on
        assert [s for s, _ in full["flops_per_step"]] == [0, 4]
        assert full["flops_per_step"][0][1] < 0.9 * plain_flops and full["flops_per_step"][1][1] == plain_flops


@pytest.mark.parametrize("switch,restart", [("routing_until", "train.routing.restart_ema"), ("lowres", "train.lowres.restart_ema")])
def test_a_restarted_ema_follows_the_new_regime(tmp_path, shapes_dir, switch, restart):
    """restart_ema: the same training (raw weights equal), but from `until` on the EMA warms up again,
    so after it the EMA is nearer the last weights than an EMA that still holds the earlier regime's."""
    from training.ema import ema_decay_at

    assert ema_decay_at(3, 0.999, restart=4) == ema_decay_at(3, 0.999) and ema_decay_at(4, 0.999, restart=4) == 0.1
    assert ema_decay_at(14, 0.999, restart=4) == ema_decay_at(10, 0.999) and ema_decay_at(14, 0.999, False, restart=4) == 0.999
    extra = {"model.depth": 4, **SWITCHES[switch], "train.ema_decay": 0.99}
    train(compose(tiny_overrides(tmp_path / "keep", shapes_dir, **extra, **{restart: False})))
    train(compose(tiny_overrides(tmp_path / "restart", shapes_dir, **extra, **{restart: True})))
    keep, restart = (latest_checkpoint(tmp_path / r / "run" / "checkpoints") for r in ("keep", "restart"))
    raw, raw_r = load_file(keep / "model.safetensors"), load_file(restart / "model.safetensors")
    assert all(torch.equal(raw[k], raw_r[k]) for k in raw)
    ema, ema_r = load_file(keep / "ema.safetensors"), load_file(restart / "ema.safetensors")
    gap, gap_r = (sum(float((e[k] - raw[k]).square().sum()) for k in raw) for e in (ema, ema_r))
    assert gap_r < 0.5 * gap


@pytest.mark.parametrize("switch", ["routing", "lowres"])
def test_switches_resume_exactly_on_mmdit(tmp_path, text_shapes_dir, switch):
    extra = {"model.depth": 4, "train.checkpoint_every": 100, **SWITCHES[switch]}
    full = train(compose(stage2_overrides(tmp_path / "a", text_shapes_dir, **extra, **{"train.count_flops": True}), "stage2"))
    train(compose(stage2_overrides(tmp_path / "b", text_shapes_dir, **{**extra, "train.max_steps": 3}), "stage2"))
    train(compose(stage2_overrides(tmp_path / "b", text_shapes_dir, **extra), "stage2"))
    a, b = (load_file(latest_checkpoint(tmp_path / r / "run" / "checkpoints") / "model.safetensors") for r in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    if switch == "lowres":  # the text tokens cost alike at both sizes, the image tokens a quarter before step 4
        (first, coarse), (switched, fine) = full["flops_per_step"]
        assert (first, switched) == (0, 4) and coarse < 0.6 * fine


def test_a_lowres_step_trains_on_pooled_latents_and_samples_stay_full_size(tmp_path, shapes_dir, monkeypatch):
    """Before `until` every batch is the full-size one average-pooled by the factor (same data, same seed);
    from `until` on, the model trains on the full size; the evaluation always samples at full size."""
    import training.step as step_mod

    seen = []
    draw = step_mod.MicroBatch.draw.__func__

    def recording(cls, x0, *args, **kwargs):
        seen.append(x0.clone())
        return draw(cls, x0, *args, **kwargs)

    monkeypatch.setattr(step_mod.MicroBatch, "draw", classmethod(recording))
    extra = {"train.max_steps": 4, "train.sample_every": 4}
    train(compose(tiny_overrides(tmp_path / "plain", shapes_dir, **extra)))
    plain, seen[:] = list(seen), []
    summary = train(compose(tiny_overrides(tmp_path / "low", shapes_dir, **extra,
                                           **{"train.lowres.factor": 2, "train.lowres.until": 2})))
    assert [tuple(x.shape[-2:]) for x in seen] == [(8, 8), (8, 8), (16, 16), (16, 16)]
    torch.testing.assert_close(seen[0], torch.nn.functional.avg_pool2d(plain[0], 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[2], plain[2], rtol=0, atol=0)
    assert "eval_class_accuracy" in summary  # evaluated: sampling at 16x16 (ccDiT refuses another size outside training)


def test_ccdit_trains_on_a_smaller_grid_as_a_model_built_for_it():
    """In training ccDiT takes a smaller latent: its positions are those of a model built for that grid
    whose coordinates span the same base range (PixArt's interpolation), the weights shared; sampling refuses it."""
    big = CCDiT(CCDiTConfig(input_size=16, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=5))
    small = CCDiT(CCDiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=5,
                              base_size=8))
    for p in big.parameters():
        torch.nn.init.normal_(p, std=0.05)  # adaLN-Zero starts every branch closed: open them
    small.load_state_dict(big.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([1, 4])
    big.train(), small.train()
    torch.testing.assert_close(big(x, t, y), small(x, t, y), rtol=0, atol=1e-6)
    assert not torch.allclose(big.pos_embed[0, :16], small.pos_embed[0])  # the 4x4 grid's own positions, not the 8x8's first
    big.eval()
    with pytest.raises(ValueError, match="built for 16x16 latents, got 8x8"):
        big(x, t, y)


@pytest.mark.parametrize("extra,message", [
    ({"train.routing.ratio": 1.5}, "0 < ratio < 1"),
    ({"train.routing.ratio": 0.5, "train.routing.until": 0}, "until 0: the first step trained on every token"),
    ({"train.routing.ratio": 0.5, "train.routing.start": 1, "train.routing.end": 3, "train.align.weight": 1.0,
      "train.align.student_block": 1, "train.align.teacher_block": 3}, "inside the routed span"),
    ({"train.align.weight": 1.0, "train.align.student_block": 3, "train.align.teacher_block": 2}, "the teacher deeper"),
    ({"train.routing.ratio": 0.5, "train.routing.mode": "drop"}, "expected route .* or mask"),
    ({"train.routing.ratio": 0.5, "train.routing.restart_ema": True}, "set train.routing.until too"),
    ({"train.routing.ratio": 0.5, "train.routing.restart_ema": True, "train.routing.until": 3, "train.ema_warmup": False},
     "train.ema_warmup=false switches off"),
    ({"train.routing.ratio": 0.5, "train.routing.restart_ema": True, "train.routing.until": 3, "train.align.weight": 0.5,
      "train.align.student_block": 0, "train.align.teacher_block": 2}, "set train.align.until=3 or lower"),
    ({"train.routing.ratio": 0.5, "train.routing.start": 0, "train.routing.mode": "mask", "train.align.weight": 0.5,
      "train.align.student_block": 1, "train.align.teacher_block": 2}, r"sees only the kept tokens: start the span later"),
    ({"train.routing.ratio": 0.5, "train.routing.mode": "mask", "train.routing.end": 3}, "end=3 must be the depth"),
    ({"train.lowres.factor": 2}, "set train.lowres.until"),
    ({"train.lowres.factor": 2, "train.lowres.until": 0}, "until 0: the first full-resolution step"),
    ({"train.lowres.factor": 3, "train.lowres.until": 2}, "latents of 16x16 do not pool by 3 into whole 2x2 patches"),
    ({"train.lowres.factor": 2, "train.lowres.until": 2, "train.align.weight": 0.5, "train.align.student_block": 0,
      "train.align.teacher_block": 2}, "teacher is the EMA, which runs at full resolution only"),
    ({"train.lowres.factor": 2, "train.lowres.until": 2, "train.repa.encoder": "runs/none"}, "use one of the two"),
    ({"train.lowres.factor": 2, "train.lowres.until": 2, "train.compile": True}, "train.compile: the graph would be built again"),
])
def test_bad_switches_are_refused_with_the_reason(tmp_path, shapes_dir, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"model.depth": 4, **extra})))


def test_the_benchmark_interpolates_to_the_target_and_counts_flops_per_regime():
    from scripts.bench_training_cost import at_target, chunk_flops

    points = [{"step": 100, "images": 6400, "flops": 1e12, "seconds": 10.0, "score": 0.4},
              {"step": 200, "images": 12800, "flops": 2e12, "seconds": 20.0, "score": 0.8},
              {"step": 300, "images": 19200, "flops": 3e12, "seconds": 30.0, "score": 0.95}]
    r = at_target(points, 0.9)  # two thirds of the way from step 200 to 300
    assert r["step"] == pytest.approx(200 + 100 * 2 / 3) and r["flops"] == pytest.approx(2e12 + 1e12 * 2 / 3)
    assert at_target(points, 0.2)["step"] == pytest.approx(50)  # from zero before the first evaluation
    assert at_target(points, 0.99) is None
    # the alignment term off at step 150: two rates; a turn resumed at step 130 from a pre-emption counts from 100
    assert chunk_flops([[100, 5], [150, 2]], 100, 200) == 50 * 5 + 50 * 2
    assert chunk_flops([[130, 5]], 100, 200) == 100 * 5


def test_the_default_span_fits_a_two_block_model(tmp_path, shapes_dir):
    """end=null is depth - 1, except where that leaves no span: the tiny preset's 2 blocks route through block 1."""
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.routing.ratio": 0.75, "train.count_flops": True})))
    plain = train(compose(tiny_overrides(tmp_path / "plain", shapes_dir, **{"train.count_flops": True})))
    assert summary["step"] == 6 and summary["flops_per_step"][0][1] < plain["flops_per_step"][0][1]


@pytest.mark.slow
def test_a_compiled_routed_forward_equals_eager():
    model = _models()["ccdit"].train()
    model.routing = ROUTING
    x, t, cond = _inputs("ccdit")
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    eager = model(x, t, **cond, route_scores=scores)
    compiled = torch.compile(model)(x, t, **cond, route_scores=scores)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    model.routing = None
