"""Inspect checkpoints in the browser: sample any stage's checkpoint, compare two, watch it denoise.

    python app/gradio_app.py --checkpoint runs/quality/stage1/checkpoints/step_0003500
    python app/gradio_app.py --checkpoint runs/quality            # folder mode: pick any checkpoint below it
    python app/gradio_app.py --checkpoint runs/quality --port 7861 --share   # --share: a public gradio.live link

The app listens on 127.0.0.1 (this machine only) unless --host or --share says
otherwise, and serves only checkpoints inside the --checkpoint folder (symlinks
resolved; uploaded files never count). Nothing is loaded at import: the first
checkpoint loads at start, the others when picked. Every checkpoint describes
itself (meta.json), so the info panel, the class picker (stage 1) or prompt box
(text stages), a control image (ControlNet checkpoints: shown beside the samples)
and the defaults come from it; its size is checked from meta.json
before anything is allocated (--max-params), and each request's work before it
runs (--max-work). One request runs at a time, others queue, and Stop cancels.
Sampling goes through inference.pipeline.generate, the function behind the
training previews and app/sample.py: same checkpoint, condition, seed and
settings give the same pixels. Bad input, and a broken checkpoint, are reported
on the page and the app keeps serving.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

MAX_STEPS, MAX_BATCH, MAX_SIDE_FACTOR = 1000, 64, 4
DISPLAY = 256  # samples are shown upscaled (nearest) to about this many pixels
MAX_PARAMS = 3e9  # larger models are refused from their meta.json, before any weight is allocated
# A request's work: steps x model evaluations per step x batch x pixels (x 2 with CFG). 1e9 is, say,
# 1024 x 1024 pixels, 50 Euler steps, batch 8 with CFG; one request holds the only worker while it runs.
MAX_WORK = 1e9
QUEUE = 16  # requests waiting at most; more are turned away

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter, add_device_arguments  # noqa: E402


class UserError(ValueError):
    """Bad input from the UI: shown to the user, the app keeps serving."""


def upload_dir() -> Path:
    """Where Gradio keeps uploaded files (and its cache)."""
    import os
    import tempfile

    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def find_checkpoints(path: str | Path) -> list[str]:
    """Checkpoint directories at or below ``path`` (run folders, init checkpoints), sorted."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return [str(p)]
    if not p.is_dir():
        return []
    root = p.resolve()
    found = {m.parent for m in p.rglob("meta.json") if (m.parent / "model.safetensors").is_file() and m.parent.resolve().is_relative_to(root)}
    return sorted(str(f) for f in found)


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    try:
        f = float(str(value).strip())
    except ValueError:
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if not lo <= int(f) <= hi:
        raise UserError(f"{name} must be between {lo} and {hi}, got {int(f)}")
    return int(f)


def _float(value: Any, name: str, lo: float, hi: float) -> float:
    try:
        f = float(str(value).strip())
    except ValueError:
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(f) and lo <= f <= hi):
        raise UserError(f"{name} must be between {lo} and {hi}, got {value!r}")
    return f


class Sampler:
    """Checkpoints (cached by path and weights) -> images, for the UI and its tests.

    root: only checkpoints inside it are served (None: any, for scripts that trust their paths).
    max_params: larger models are refused from meta.json. max_work: larger requests are refused."""

    def __init__(self, root: str | Path | None = None, max_params: float = MAX_PARAMS, max_work: float = MAX_WORK,
                 device: str = "auto", dtype: str = "fp32"):
        self.root = Path(root).resolve() if root is not None else None
        self.max_params, self.max_work = max_params, max_work
        self.device, self.dtype = device, dtype
        self._cache: dict[tuple[str, str], Any] = {}

    def checkpoint_dir(self, path: str) -> Path:
        """The checkpoint folder ``path`` names, inside the served folder (symlinks resolved)."""
        from models.checkpoint import resolve

        if not path:
            raise UserError("no checkpoint chosen")
        folder = resolve(path).resolve()
        if self.root is not None and not folder.is_relative_to(self.root):
            raise UserError(f"{path} is outside the folder this app serves ({self.root})")
        if folder.is_relative_to(upload_dir()):
            raise UserError(f"{path} is an uploaded file, never a checkpoint this app serves")
        return folder

    def load(self, path: str, weights: str = "ema"):
        """The checkpoint's Pipeline (inference/pipeline.py); UserError when it cannot be used."""
        from inference.pipeline import Pipeline
        from models.checkpoint import read_meta
        from models.presets import parameter_count

        key = (str(self.checkpoint_dir(path)), weights)
        if key not in self._cache:
            try:
                meta = read_meta(key[0])
                n = parameter_count(meta["family"], meta["model_config"])
                if n > self.max_params:
                    raise UserError(f"its model has {n / 1e9:.2f}B parameters, more than this app serves ({self.max_params / 1e9:g}B; "
                                    "start it with a larger --max-params)")
                self._cache[key] = Pipeline.load(key[0], use_ema=weights == "ema", device=self.device, dtype=self.dtype)
            except Exception as e:  # missing, truncated, pickled, too large, an init without an encoder: say so, keep serving
                raise UserError(f"cannot load checkpoint {path}: {e}") from e
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def info(self, path: str) -> str:
        from models.presets import count_parameters

        pipe = self.load(path)
        meta, s = pipe.meta, pipe.defaults()
        cond = meta["conditioning"]
        lines = [
            f"**{meta['stage']}** · step {meta['step']} · {meta['family']} `{meta['preset']}` · "
            f"{count_parameters(pipe.model) / 1e6:.2f}M parameters · EMA {'yes' if meta.get('has_ema') else 'no'}",
            f"conditioning: {cond['type']}"
            + (f" ({cond['num_classes']} classes)" if "num_classes" in cond else f" ({cond['text_encoder']['name']}, "
               f"{cond['text_encoder']['max_length']} tokens)"),
            f"latent {tuple(pipe.latent_shape())} · autoencoder {meta['autoencoder']['name']} · "
            f"sampling defaults: {s.steps} {s.solver} steps, CFG {s.cfg_scale}, shift {s.shift}",
        ]
        config = pipe.path / "config.yaml"
        if config.is_file():
            lines.append(_trained_with(config))
        return "  \n".join(lines)

    def choices(self, path: str) -> list[str] | None:
        """The classes to pick from, or None for a checkpoint that takes free text."""
        return self.load(path).conditioning.choices()

    def view(self, path: str) -> tuple[list[str] | None, Any, list[str], tuple[int, int]]:
        """What the page shows for a checkpoint: (classes or None for free text, sampling defaults, example
        prompts (a text checkpoint's evaluation prompts), its trained size in pixels)."""
        pipe = self.load(path)
        _, gh, gw = pipe.latent_shape()
        return (pipe.conditioning.choices(), pipe.defaults(), list(getattr(pipe.conditioning, "examples", None) or []),
                (gh * pipe.downsample, gw * pipe.downsample))

    def control_kind(self, path: str) -> str | None:
        """The control map a ControlNet checkpoint follows (edges, mask), or None for any other checkpoint."""
        return getattr(self.load(path).conditioning, "control_kind", None)

    def sample(self, path: str, weights: str = "ema", condition: str = "", negative_prompt: str = "", cfg_scale: Any = None,
               steps: Any = None, solver: str | None = None, shift: Any = None, seed: Any = 0, batch: Any = 4,
               height: Any = None, width: Any = None, trajectory: bool = False, progress=None, control: Any = None,
               derive: bool = False, control_scale: Any = None):
        """-> (images (N, H, W, 3) uint8, trajectory strip uint8 or None, record of every setting, with the command
        line that reproduces the images). Seed -1 draws one (the record says which). The denoising strip is
        Euler's; with another solver it is left out, with a note. ``progress(fraction)`` as sampling goes.
        ControlNet checkpoints need ``control``: a picture (uint8 array, PIL image or path) that is the map, or
        with ``derive`` one to derive the map from; the map used is saved and named in the record ("control")."""
        import secrets
        import warnings

        import torch

        from flow.sampling import EVALS_PER_STEP, SOLVERS
        from inference.conditioning import ConditioningError
        from inference.images import make_grid, to_uint8

        pipe = self.load(path, weights)
        d = pipe.defaults()
        settings = pipe.defaults(
            steps=_int(d.steps if steps in (None, "") else steps, "steps", 1, MAX_STEPS),
            cfg_scale=_float(d.cfg_scale if cfg_scale in (None, "") else cfg_scale, "CFG scale", 0.0, 100.0),
            solver=solver or None,
            shift=_float(d.shift if shift in (None, "") else shift, "shift", 0.01, 100.0),
            seed=_int(seed, "seed", -1, 2**63 - 1),
            control_scale=_float(d.control_scale if control_scale in (None, "") else control_scale, "control scale", 0.0, 10.0),
        )
        if settings.seed == -1:
            settings.seed = secrets.randbelow(2**31)
        if settings.solver not in SOLVERS:
            raise UserError(f"unknown solver {settings.solver!r}; choose one of {', '.join(SOLVERS)}")
        try:  # what the checkpoint predicts decides the solvers it takes (an epsilon model: dpm++ or ddim)
            settings.objective.check_solver(settings.solver)
        except ValueError as e:
            raise UserError(str(e)) from None
        note = None
        if trajectory and settings.solver != "euler":
            trajectory, note = False, f"the denoising strip shows Euler steps: left out for {settings.solver}"
        n = _int(batch, "batch", 1, MAX_BATCH)
        _, gh, gw = pipe.latent_shape()
        h = _int(gh * pipe.downsample if height in (None, "") else height, "height", 1, 10**5)
        w = _int(gw * pipe.downsample if width in (None, "") else width, "width", 1, 10**5)
        evals = settings.steps * EVALS_PER_STEP[settings.solver]  # the solver is one of SOLVERS: checked above
        work = evals * n * h * w * (2 if settings.cfg_scale != 1 else 1)
        if work > self.max_work:
            raise UserError(f"this request is {work:.2g} pixel-evaluations (steps x solver evaluations x batch x pixels x 2 for CFG), "
                            f"more than this app runs at once ({self.max_work:.2g}): fewer steps, a smaller batch or size, or euler")
        try:
            shape = pipe.latent_shape(h, w, MAX_SIDE_FACTOR)
            control_png = None
            if getattr(pipe.conditioning, "control_kind", None):
                condition, control_png = self._control_prompt(pipe, str(condition), control, derive, h, w)
            values = pipe.conditioning.parse([condition if control_png else str(condition)])
        except (ValueError, ConditioningError) as e:
            raise UserError(str(e)) from None
        if len(values) != 1:
            raise UserError(f"pick one class, not {condition!r}")
        value = values[0]
        meta, text = pipe.meta, pipe.conditioning.choices() is None
        record: dict[str, Any] = {"checkpoint": str(pipe.path), "stage": meta["stage"], "step": meta["step"], "weights": weights}
        if control_png:
            record.update(prompt=value.prompt, negative_prompt=str(negative_prompt or ""), control=str(control_png),
                          control_kind=pipe.conditioning.control_kind)
        elif text:
            record.update(prompt=value, negative_prompt=str(negative_prompt or ""))
        else:
            record.update(class_id=value, class_name=pipe.conditioning.describe(value) if pipe.conditioning.class_names else None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pipe([value] * n, settings, negative=str(negative_prompt or ""), shape=shape, return_trajectory=trajectory,
                       callback=(lambda i: progress(min(i / evals, 1.0))) if progress else None)
        record["warnings"] = [str(x.message) for x in caught if "truncated" in str(x.message)] + ([note] if note else [])
        images, traj = out if trajectory else (out, None)
        record.update(settings.to_dict(), batch=n, height=h, width=w)
        record["command"] = _command(record, weights, self.device, self.dtype)
        strip = None
        if traj:
            first = torch.stack([x[0] for x in traj])  # sample 0's prediction of x0 at every step
            strip = make_grid(to_uint8(first), ncols=len(traj), upscale=max(1, 96 // max(h, w)))
        return to_uint8(images), strip, record

    def _control_prompt(self, pipe, prompt: str, control: Any, derive: bool, height: int, width: int):
        """(the ControlNet's input, the PNG of the map it follows): the map is saved under the upload folder by
        its content, so the record's command can name it."""
        import hashlib

        import numpy as np
        from PIL import Image

        from inference.conditioning import ControlPrompt
        from inference.images import save_png, to_uint8

        if control is None or (isinstance(control, str) and not control):
            raise UserError(f"this checkpoint is a ControlNet ({pipe.conditioning.control_kind} maps): give a control image "
                            "(the map itself, or a picture with 'derive the map' ticked)")
        try:
            picture = Image.open(control) if isinstance(control, (str, Path)) else control
            pixels = pipe.conditioning.control_image(picture, height, width, derive=bool(derive))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot use the control image: {e}") from None
        used = to_uint8(pixels[None])[0]
        folder = upload_dir() / "controls"
        png = save_png(used, folder / f"{hashlib.sha256(np.ascontiguousarray(used).tobytes()).hexdigest()[:16]}.png")
        return ControlPrompt(prompt, pixels), png


def _command(record: dict, weights: str, device: str, dtype: str) -> str:
    """The app/sample.py command that draws the same images (its grid holds them in one column)."""
    import shlex

    what = (["--prompt", record["prompt"], "--negative-prompt", record["negative_prompt"]] if "prompt" in record
            else ["--classes", str(record["class_id"])])
    if "control" in record:  # the map used, as saved (derived already: no --control-from)
        what += ["--control", record["control"], "--control-scale", record["control_scale"]]
    args = ["python", "app/sample.py", record["checkpoint"], *what, "--per-class", record["batch"], "--cfg", record["cfg_scale"],
            "--steps", record["steps"], "--solver", record["solver"], "--shift", record["shift"], "--seed", record["seed"],
            "--height", record["height"], "--width", record["width"], "--device", device, "--dtype", dtype,
            *(["--raw"] if weights == "raw" else [])]
    return shlex.join(str(a) for a in args)


def _trained_with(config: Path) -> str:
    try:
        from omegaconf import OmegaConf

        c = OmegaConf.load(config)
        t = c.get("train", {})
        return (f"trained with: data `{c.get('data', {}).get('path')}` · global batch {t.get('global_batch_size')} · "
                f"lr {t.get('lr')} · max steps {t.get('max_steps')} · precision {c.get('precision', {}).get('linear')}")
    except Exception as e:  # a damaged config.yaml costs the info line, not the app
        return f"⚠️ its config.yaml cannot be read ({type(e).__name__})"


def _derive_label(kind: str | None) -> str:
    return f"derive the {kind or 'control'} map from this picture"


def _display(images):
    import numpy as np

    up = max(1, DISPLAY // max(images.shape[1], images.shape[2]))
    return [np.ascontiguousarray(im.repeat(up, 0).repeat(up, 1)) for im in images]


def build_ui(checkpoints: list[str], sampler: Sampler | None = None, first_info: str = "", first: str | None = None):
    """The page; it opens with ``first`` (default: the first of ``checkpoints``)."""
    import gradio as gr
    import numpy as np
    from PIL import Image

    from flow.sampling import SOLVERS

    sampler = sampler or Sampler()
    first = first or (checkpoints[0] if checkpoints else None)
    classes, d, examples, size, kind = [], None, [], (None, None), None
    try:
        if first:
            classes, d, examples, size = sampler.view(first)
            kind = sampler.control_kind(first)  # a ControlNet: the page shows the control image's inputs
            first_info = first_info or sampler.info(first)
    except Exception as e:  # a broken first checkpoint: say so, the others stay pickable
        first_info = f"⚠️ {e}"
    text = classes is None  # free text: a prompt box instead of the class picker

    def on_pick(path):
        try:
            classes, d, ex, (h, w) = sampler.view(path)
            kind = sampler.control_kind(path)
            return (sampler.info(path), gr.update(choices=classes or [], value=classes[0] if classes else None, visible=classes is not None),
                    gr.update(visible=classes is None), gr.update(visible=classes is None),
                    gr.update(choices=ex, value=None, visible=bool(ex)), d.cfg_scale, d.steps, d.solver, d.shift, h, w, "",
                    gr.update(visible=kind is not None), gr.update(visible=kind is not None), gr.update(label=_derive_label(kind)))
        except Exception as e:  # a broken checkpoint: its error in the info panel, the app keeps serving
            return (f"⚠️ {e}", *(gr.update() for _ in range(10)), f"⚠️ {e}", *(gr.update() for _ in range(3)))

    def condition(path, klass, prompt):
        return prompt if sampler.choices(path) is None else klass

    def run(path, weights, klass, prompt, negative, cfg, steps, solver, shift, seed, batch, height, width, trajectory,
            control=None, derive=False, control_scale=None, progress=gr.Progress()):
        try:
            images, strip, record = sampler.sample(path, weights, condition(path, klass, prompt), negative, cfg, steps,
                                                   solver, shift, seed, batch, height, width, trajectory, progress=progress,
                                                   control=control, derive=derive, control_scale=control_scale)
            note = "; ".join(record.get("warnings", []) + [f"{len(images)} samples, seed {record['seed']}"])
            used = _display(np.asarray(Image.open(record["control"]).convert("RGB"))[None])[0] if "control" in record else None
            return _display(images), strip, record, note, used
        except UserError as e:
            return None, None, None, f"⚠️ {e}", None
        except Exception as e:  # an unexpected failure still leaves the app serving
            return None, None, None, f"⚠️ sampling failed: {type(e).__name__}: {e}", None

    def compare(path_a, weights_a, path_b, weights_b, klass, prompt, negative, cfg, steps, solver, shift, seed, batch):
        outs = []
        for path, weights in ((path_a, weights_a), (path_b, weights_b)):
            try:
                images, _, record = sampler.sample(path, weights, condition(path, klass, prompt), negative, cfg, steps,
                                                   solver, shift, seed, batch)
                outs += [_display(images), f"{record['stage']} step {record['step']} ({weights})"]
            except Exception as e:
                outs += [None, f"⚠️ {e}"]
        return tuple(outs)

    with gr.Blocks(title="flowdit sampler") as ui:
        gr.Markdown("## flowdit sampler")
        with gr.Row():
            ckpt = gr.Dropdown(checkpoints, value=first, label="checkpoint", allow_custom_value=True, scale=4)
            weights = gr.Radio(["ema", "raw"], value="ema", label="weights", scale=1)
        info = gr.Markdown(first_info or "no checkpoint found")
        with gr.Row():
            klass = gr.Dropdown(classes or [], value=classes[0] if classes else None, label="class", visible=not text,
                                allow_custom_value=True)
            prompt = gr.Textbox(label="prompt", visible=text, value=examples[0] if examples else "")
            negative = gr.Textbox(label="negative prompt (empty = the null condition)", visible=text, value="")
        example = gr.Dropdown(examples, value=None, label="example prompts (the checkpoint's evaluation prompts)",
                              visible=bool(examples))
        with gr.Row(visible=kind is not None) as control_row:  # ControlNet checkpoints only
            control = gr.Image(label="control image: the map (white = inside), or a picture to derive it from", type="numpy",
                               image_mode="RGB", format="png")
            with gr.Column():
                derive = gr.Checkbox(label=_derive_label(kind), value=False)
                control_scale = gr.Number(label="control scale (0: the base model alone)", value=d.control_scale if d else 1.0)
        with gr.Row():
            # bounds are checked by Sampler.sample, which says what is wrong in the status line
            cfg = gr.Number(label="CFG scale", value=d.cfg_scale if d else None)
            steps = gr.Number(label="steps", value=d.steps if d else None, precision=0)
            solver = gr.Dropdown(list(SOLVERS), value=d.solver if d else None, label="solver")
            shift = gr.Number(label="timestep shift", value=d.shift if d else None)
        with gr.Row():
            seed = gr.Number(label="seed (-1: random)", value=0, precision=0)
            batch = gr.Slider(1, MAX_BATCH, value=4, step=1, label="batch")
            height = gr.Number(label="height (px)", value=size[0], precision=0)
            width = gr.Number(label="width (px)", value=size[1], precision=0)
            trajectory = gr.Checkbox(label="denoising strip (Euler steps)", value=True)
        with gr.Row():
            go = gr.Button("Generate", variant="primary", scale=3)
            cancel = gr.Button("Stop", scale=1)
        status = gr.Markdown("")
        with gr.Row():
            gallery = gr.Gallery(label="samples", columns=4, format="png", elem_id="samples", scale=3)
            control_used = gr.Image(label="control map used", format="png", interactive=False, visible=kind is not None,
                                    scale=1, elem_id="control-used")
        strip = gr.Image(label="denoising: predicted clean image at each step (sample 1)", format="png")
        record = gr.JSON(label="settings, and the app/sample.py command that reproduces them")
        with gr.Accordion("compare two checkpoints (same seed and settings)", open=False):
            with gr.Row():
                ckpt_b = gr.Dropdown(checkpoints, value=first, label="checkpoint B", allow_custom_value=True)
                weights_b = gr.Radio(["ema", "raw"], value="raw", label="weights B")
            go_b = gr.Button("Compare")
            with gr.Row():
                with gr.Column():
                    label_a, gallery_a = gr.Markdown(), gr.Gallery(label="A", columns=2, format="png")
                with gr.Column():
                    label_b, gallery_b = gr.Markdown(), gr.Gallery(label="B", columns=2, format="png")
        ckpt.change(on_pick, [ckpt], [info, klass, prompt, negative, example, cfg, steps, solver, shift, height, width, status,
                                      control_row, control_used, derive], api_name="pick")
        example.change(lambda e: e or gr.update(), [example], [prompt], api_name=False)  # page-only: not part of the API
        inputs = [ckpt, weights, klass, prompt, negative, cfg, steps, solver, shift, seed, batch, height, width, trajectory,
                  control, derive, control_scale]
        outputs = [gallery, strip, record, status, control_used]
        running = [go.click(run, inputs, outputs, api_name="generate"),
                   prompt.submit(run, inputs, outputs, api_name=False),  # the same as /generate
                   go_b.click(compare, [ckpt, weights, ckpt_b, weights_b, klass, prompt, negative, cfg, steps, solver, shift, seed, batch],
                              [gallery_a, label_a, gallery_b, label_b], api_name="compare")]
        cancel.click(None, None, None, cancels=running, api_name="stop")
    ui.queue(default_concurrency_limit=1, max_size=QUEUE)  # one sampling request at a time; the rest wait their turn
    return ui


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint directory, a run directory or a folder of runs")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=7860, help="port to listen on")
    ap.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    ap.add_argument("--max-params", type=float, default=MAX_PARAMS, help="largest model served, in parameters")
    ap.add_argument("--max-work", type=float, default=MAX_WORK,
                    help="largest request: steps x solver evaluations x batch x pixels x 2 with CFG")
    add_device_arguments(ap)
    args = ap.parse_args(argv)
    found = find_checkpoints(args.checkpoint)
    if not found:
        raise SystemExit(f"no checkpoint found at or below {args.checkpoint} (looked for folders with meta.json + model.safetensors)")
    sampler = Sampler(args.checkpoint, args.max_params, args.max_work, args.device, args.dtype)
    newest = max(found, key=lambda c: (Path(c) / "meta.json").stat().st_mtime)
    ui = build_ui(found, sampler, first=newest)  # the newest checkpoint loads here, at start, not at import
    print(f"{len(found)} checkpoint(s); serving on http://{args.host}:{args.port}" + (" and a public share link" if args.share else ""))
    ui.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True)  # quiet: our line above says where


if __name__ == "__main__":
    main()
