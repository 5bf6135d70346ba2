"""FID / KID against real images (data/fid.py): the numbers are torchmetrics' to the digit, the reference
set is pinned, and nothing is downloaded (the Inception weights are random ones saved to a local file).

Most tests use a tiny random feature extractor (8 features, milliseconds). One runs torch-fidelity's real
Inception network (random weights, 2048 features at 299x299) on two images and checks its features only:
FID on 2048 features spends ~8 s in torchmetrics' eigenvalues on 2 CPU cores, and that arithmetic is the
same one the tiny extractor's tests check against torchmetrics."""
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data.evaluator import ShapesEvaluator, make_evaluator
from data.fid import FIDEvaluator, to_uint8
from data.shards import ShardWriter

N = 48  # images per set: more than the tiny extractor's 8 features, so the covariances are full rank


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test instead of reaching for the network."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    except (ImportError, RuntimeError):  # not installed (the metrics extra): nothing of it can download
        return
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)  # its own import of it


class TinyFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 8): Inception's interface at a millionth of its cost (a random conv's pooled
    responses, and how busy each channel is: enough to tell flat images from noise)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        x = x.float() / 127.5 - 1
        pooled = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return torch.cat([self.fc(pooled), 2 * x.std(dim=(2, 3))], 1)


class NotATensor:
    """What a malicious or careless weights file may hold instead of tensors."""


def plain_images(seed: int, n: int = N) -> np.ndarray:
    """(n, 16, 16, 3) uint8: flat colours with a little noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 215, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 8, (n, 16, 16, 3)), 0, 255).round().astype(np.uint8)


def noise_images(seed: int, n: int = N) -> np.ndarray:
    """(n, 16, 16, 3) uint8: loud noise, nothing like plain_images."""
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> what the sampler returns: float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def write_folder(folder, images: np.ndarray, order=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i in order if order is not None else range(len(images)):
        Image.fromarray(images[i]).save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture
def tiny_weights(tmp_path):
    """A random TinyFeatures saved as safetensors: evaluators built from it all extract the same features."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file(TinyFeatures().state_dict(), str(path))
    return path


@pytest.fixture
def plain_dir(tmp_path):
    return write_folder(tmp_path / "plain", plain_images(0))


def tiny_evaluator(reference, weights, **kw) -> FIDEvaluator:
    torch.manual_seed(123)  # a different random init: the weights file must be what counts
    return FIDEvaluator(reference, weights=weights, feature_extractor=TinyFeatures(), **kw)


def test_fid_of_a_set_with_itself_is_zero_and_of_different_sets_large(plain_dir, tiny_weights):
    ev = tiny_evaluator(plain_dir, tiny_weights, kid_subset_size=16)
    same = ev.score(as_float(plain_images(0)), None)
    similar = ev.score(as_float(plain_images(1)), None)  # new draws of the same kind of image
    different = ev.score(as_float(noise_images(2)), None)
    assert set(same) == {"fid", "kid", "kid_std", "fid_setup"}
    # identical features on both sides: what is left is the matrix square root's rounding (~1e-16 here)
    assert abs(same["fid"]) < 1e-6
    assert different["fid"] > 100 * similar["fid"] > 0  # here 3.2 against 0.004
    # KID is an unbiased estimate, ~0 for the same distribution (slightly negative for a set with itself)
    assert different["kid"] > 100 * max(abs(same["kid"]), abs(similar["kid"]))  # here 2.1 against 0.0006
    setup = same["fid_setup"]
    assert setup["num_generated"] == N and setup["reference_count"] == N and setup["kid_subset_size"] == 16
    assert setup["feature_extractor"] == "TinyFeatures" and setup["feature_dim"] == 8
    assert setup["feature_weights_sha256"] == hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    json.dumps(setup)  # the caller writes it into JSON


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_equal_torchmetrics_computed_directly(plain_dir, tiny_weights):
    from safetensors.torch import load_file
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    ev = tiny_evaluator(plain_dir, tiny_weights, kid_subset_size=20)
    generated = np.concatenate([plain_images(5, 30), noise_images(6, 10)])
    ours = ev.score(as_float(generated), None)

    extractor = TinyFeatures()
    extractor.load_state_dict(load_file(str(tiny_weights)))
    real, fake = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (plain_images(0), generated))
    fid = FrechetInceptionDistance(feature=extractor)
    kid = KernelInceptionDistance(feature=extractor, subset_size=20)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    torch.manual_seed(0)  # the evaluator's KID seed
    kid_mean, kid_std = kid.compute()
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert ours["kid"] == pytest.approx(float(kid_mean), rel=1e-5)
    assert ours["kid_std"] == pytest.approx(float(kid_std), rel=1e-5)
    # the reference features are kept: a second score of the same images gives the same numbers
    again = ev.score(as_float(generated), None)
    assert (again["fid"], again["kid"]) == (ours["fid"], ours["kid"])


def test_kid_subset_size_is_capped_by_the_generated_count(plain_dir, tiny_weights):
    ev = tiny_evaluator(plain_dir, tiny_weights, kid_subset_size=1000)
    result = ev.score(as_float(plain_images(3, 10)), None)
    assert result["fid_setup"]["kid_subset_size"] == 10 and np.isfinite(result["kid"])
    with pytest.raises(ValueError, match="at least 2 generated images"):
        ev.score(as_float(plain_images(3, 1)), None)


def test_reference_set_is_pinned(tmp_path, tiny_weights):
    images = plain_images(0)
    a = write_folder(tmp_path / "a", images)
    b = write_folder(tmp_path / "b", images, order=np.random.default_rng(1).permutation(N))  # written in another order
    ev_a, ev_b = tiny_evaluator(a, tiny_weights), tiny_evaluator(b, tiny_weights)
    assert ev_a.reference.keys == [f"img{i:03d}.png" for i in range(N)]
    assert ev_a.reference.keys_sha256 == ev_b.reference.keys_sha256
    assert ev_a.reference.keys_sha256 == hashlib.sha256("\n".join(ev_a.reference.keys).encode()).hexdigest()
    assert torch.equal(ev_a.reference_features(), ev_b.reference_features())
    first = tiny_evaluator(a, tiny_weights, max_reference=10)  # the first 10 in key order, not in file-system order
    assert first.reference.keys == [f"img{i:03d}.png" for i in range(10)]
    assert torch.equal(first.reference_features(), ev_a.reference_features()[:10])
    d = first.describe()
    assert (d["reference"], d["reference_count"], d["reference_kind"]) == (str(a), 10, "images")
    assert d["reference_keys_sha256"] != ev_a.describe()["reference_keys_sha256"]


def test_grey_images_are_repeated_to_three_channels(tmp_path, tiny_weights):
    grey = plain_images(0)[..., :1]
    folder = tmp_path / "grey"
    folder.mkdir()
    for i, g in enumerate(grey):
        Image.fromarray(g[..., 0], mode="L").save(folder / f"g{i:03d}.png")
    ev = tiny_evaluator(folder, tiny_weights)
    as_rgb = as_float(np.repeat(grey, 3, axis=-1))
    assert torch.equal(ev.reference_features(), ev.features(as_rgb))
    assert torch.equal(ev.features(as_rgb[:, :1]), ev.features(as_rgb))  # a 1-channel batch from the sampler too


def test_reference_from_pixel_shards_equals_the_same_images_as_files(tmp_path, plain_dir, tiny_weights):
    images = plain_images(0)
    with ShardWriter(tmp_path / "shards", samples_per_shard=10, manifest_fields={"autoencoder": "none"}) as w:
        for i in np.random.default_rng(2).permutation(N):  # stored out of key order, over 5 shards
            w.write(f"img{i:03d}", as_float(images[i : i + 1])[0].numpy().astype(np.float16), {"label": 0})
    from_shards = tiny_evaluator(tmp_path / "shards", tiny_weights, max_reference=30)
    assert from_shards.reference.keys == [f"img{i:03d}" for i in range(30)]
    from_files = tiny_evaluator(plain_dir, tiny_weights, max_reference=30)
    # fp16 pixels in [-1, 1] round back to the same uint8 values, so the features are the same
    assert torch.equal(from_shards.reference_features(), from_files.reference_features())
    assert from_shards.describe()["reference_kind"] == "shards"


def test_latent_shards_need_a_decode(tmp_path, tiny_weights):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "latents", samples_per_shard=8, manifest_fields={"autoencoder": "some/vae"}) as w:
        for i in range(12):
            w.write(f"s{i:02d}", rng.standard_normal((4, 4, 4)).astype(np.float16), {"label": 0})
    with pytest.raises(ValueError, match="latents of autoencoder 'some/vae'.*pass decode="):
        tiny_evaluator(tmp_path / "latents", tiny_weights)
    calls = []

    def decode(z):  # (N, 4, 4, 4) stored latents -> (N, 3, 16, 16) images in [-1, 1]
        calls.append(z.shape[0])
        return torch.tanh(F.interpolate(z[:, :3], scale_factor=4))

    ev = tiny_evaluator(tmp_path / "latents", tiny_weights, decode=decode, batch_size=5)
    assert ev.reference_features().shape == (12, 8) and sum(calls) == 12
    assert ev.describe()["reference_autoencoder"] == "some/vae"


def test_missing_or_empty_reference_is_a_clear_error(tmp_path, tiny_weights):
    with pytest.raises(ValueError, match="needs a reference set of real images: set reference: PATH"):
        tiny_evaluator(None, tiny_weights)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny_evaluator(tmp_path / "nowhere", tiny_weights)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json and no PNG/JPEG images"):
        tiny_evaluator(tmp_path / "empty", tiny_weights)
    with pytest.raises(ValueError, match=r"data.evaluator.reference is missing.*\{kind: fid, reference: PATH\}"):
        make_evaluator({"kind": "fid", "weights": str(tiny_weights)})
    with pytest.raises(ValueError, match=r"data.evaluator=fid needs the real images.*\{kind: fid, reference: PATH\}"):
        make_evaluator("fid")


def test_unsafe_weights_files_are_refused(plain_dir, tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"conv.weight": NotATensor()}, path)  # a pickle that torch.load(weights_only=True) will not run
    with pytest.raises(ValueError, match=r"weights_only=True"):
        tiny_evaluator(plain_dir, path)
    with pytest.raises(FileNotFoundError, match="weights: null for torch-fidelity's own"):
        tiny_evaluator(plain_dir, tmp_path / "missing.pt")


def test_make_evaluator_names_and_specs(plain_dir):
    from omegaconf import OmegaConf

    assert make_evaluator(None) is None
    assert isinstance(make_evaluator("shapes"), ShapesEvaluator)
    assert isinstance(make_evaluator(OmegaConf.create({"kind": "shapes"})), ShapesEvaluator)
    with pytest.raises(ValueError, match=r"data.evaluator='bogus': expected one of \['shapes'\]"):
        make_evaluator("bogus")
    with pytest.raises(ValueError, match=r"unknown settings \['refrence'\]"):
        make_evaluator({"kind": "fid", "refrence": str(plain_dir)})


# ---------------------------------------------------------------- the real Inception network, random weights
def inception_module():
    """torch-fidelity's Inception module, or a skip: it comes with the metrics extra and needs a torchvision
    built for the installed torch, which a CPU-only machine without the matching wheel cannot have."""
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"torch-fidelity (pip install -e '.[metrics]', with a torchvision matching torch) is not importable: {e}")
    return tf_inception


def random_inception_state() -> dict:
    """torch-fidelity's Inception-v3 with random weights, built without its download."""
    tf_inception = inception_module()
    from torchmetrics.image.fid import NoTrainInceptionV3

    class Unloaded(NoTrainInceptionV3):
        def load_state_dict(self, state, strict=True, assign=False):  # keep the random init
            return super().load_state_dict(state, strict=False)

    patch = pytest.MonkeyPatch()
    patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    try:
        torch.manual_seed(0)
        return Unloaded("inception-v3-compat", ["2048"]).state_dict()
    finally:
        patch.undo()


def test_inception_from_a_local_file_matches_torchmetrics(tmp_path):
    inception_module()
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from torchmetrics.image.fid import NoTrainInceptionV3

    state = random_inception_state()
    save_file(state, str(tmp_path / "inception.safetensors"))
    torch.save(state, tmp_path / "inception.pt")
    images = plain_images(0, 2)  # Inception at 299x299 costs ~0.5 s an image on 2 CPU cores
    ev = make_evaluator(OmegaConf.create({"kind": "fid", "reference": str(write_folder(tmp_path / "ref", images)),
                                          "weights": str(tmp_path / "inception.safetensors"), "max_reference": 2,
                                          "kid_subset_size": 2, "clip_model": None}))
    ours = ev.reference_features()
    # torchmetrics' own Inception, loading the same weights itself, with the TF1-compatible resize
    direct = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "inception.pt"),
                                antialias=False)
    mine, theirs = ev.extractor.state_dict(), direct.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    expected = direct(torch.from_numpy(images[:1]).permute(0, 3, 1, 2))  # one image: each costs ~0.5 s
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours[:1], expected, rtol=1e-5, atol=0)
    d = ev.describe()
    assert d["feature_extractor"].startswith("torch-fidelity inception-v3") and "TF1-compatible" in d["resize"]
    assert d["feature_dim"] == 2048 and d["clip_model"] is None
    assert d["feature_weights_sha256"] == hashlib.sha256((tmp_path / "inception.safetensors").read_bytes()).hexdigest()


def test_to_uint8_is_the_pinned_conversion():
    """round((x + 1) * 127.5), clamped to [0, 255] (half to even: 0.0 -> 127.5 -> 128)."""
    x = torch.tensor([-1.5, -1.0, -0.99, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 7)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 1, 128, 255, 255, 255]


# ---------------------------------------------------------------- CLIP score, a tiny random CLIP saved locally
def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE vocabulary is written in (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep)) | {b: 256 + i for i, b in enumerate(moved)}
    return [chr(table[b]) for b in range(256)]


def tiny_clip(folder):
    """A random 1-layer CLIP (32-d, 32x32 images) with a bytes-only tokenizer, saved as transformers would."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir()
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(layer, vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=len(vocab) - 2,
                                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
                        vision_config=dict(layer, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_from_a_local_clip_model(plain_dir, tiny_weights, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    clip = tiny_clip(tmp_path / "clip")
    ev = tiny_evaluator(plain_dir, tiny_weights, clip_model=str(clip), batch_size=5)
    images = as_float(plain_images(3, 12))
    words = [f"a {c} square" for c in ("red", "green", "blue")] * 4
    result = ev.score(images, words)
    assert result["fid_setup"]["clip_model"] == str(clip)
    # what CLIP score is: 100 * the cosine of image and text embeddings, averaged (floored at 0)
    model, processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)
    with torch.no_grad():
        pixels = processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
        tokens = processor(text=words, return_tensors="pt", padding=True)
        img = model.get_image_features(pixels)
        txt = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    expected = (100 * F.cosine_similarity(img, txt, dim=-1)).mean().item()
    assert expected > 0 and result["clip_score"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="one description per image: 12 images, 3 descriptions"):
        ev.score(images, words[:3])


# ---------------------------------------------------------------- the evaluation hands the evaluator its samples
class Counting:
    """Stands in for an evaluator: records how many images it was given."""

    def __init__(self, per_condition: bool, scores: dict):
        self.per_condition, self.scores, self.seen = per_condition, scores, []

    def score(self, images, descriptions):
        self.seen.append(len(descriptions))
        return dict(self.scores)


def test_evaluation_names_scores_and_counts_samples_by_evaluator(monkeypatch):
    from types import SimpleNamespace

    import inference.evaluation as evaluation

    monkeypatch.setattr(evaluation, "generate", lambda model, ae, cond, uncond, shape, *_, **k: torch.zeros(len(cond), *shape))
    conditioning = SimpleNamespace(accuracy_name="class_accuracy", describe=str, guided=lambda chosen, device: (chosen, None),
                                   agreement=lambda images, values: {})
    values = list(range(12))  # 12 classes, 10 samples asked for

    def run(evaluator):
        spec = evaluation.EvalSpec(values, 10, SimpleNamespace(seed=0), (3, 8, 8), evaluator, batch=7)  # two sampling calls
        return evaluation.evaluate(None, None, conditioning, spec, "cpu", None)

    shapes_like = Counting(True, {"all": 0.5, "shape": 0.75})
    assert run(shapes_like) == {"class_accuracy": 0.5, "shape_accuracy": 0.75}
    fid_like = Counting(False, {"fid": 12.5, "kid": 0.01, "fid_setup": {"reference_count": 4}})
    assert run(fid_like) == {"fid": 12.5, "kid": 0.01, "fid_setup": {"reference_count": 4}}
    assert shapes_like.seen == [24] and fid_like.seen == [10]  # two per class for per-condition scores; exactly 10 for FID


def test_evaluation_samples_in_chunks_the_same_images(monkeypatch):
    """An FID-sized evaluation samples spec.batch at a time, from noise drawn for all of them first."""
    import inference.evaluation as evaluation
    from inference.conditioning import ClassConditioning
    from inference.pipeline import SampleSettings
    from models.autoencoder import load_autoencoder
    from models.presets import build_model, model_config

    torch.manual_seed(0)
    model = build_model("ccdit", model_config("ccdit", "tiny", input_size=8, in_channels=3, num_classes=4)).eval()
    grabbed = []
    evaluator = Counting(False, {"fid": 1.0})
    evaluator.score = lambda images, descriptions: grabbed.append(images) or {"fid": 1.0}
    for batch in (1024, 3):
        spec = evaluation.EvalSpec(list(range(4)), 10, SampleSettings(4, 2.0, "euler", 1.0, 0), (3, 8, 8), evaluator, batch=batch)
        evaluation.evaluate(model, load_autoencoder("none"), ClassConditioning(4), spec, "cpu", None)
    assert grabbed[0].shape == (10, 3, 8, 8)
    torch.testing.assert_close(grabbed[1], grabbed[0], rtol=0, atol=1e-5)
