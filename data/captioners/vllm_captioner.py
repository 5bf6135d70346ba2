"""A VLM captioner through vLLM: a dense long caption and a short one per image.

GPU only, and imported only when `python -m data.prepare --captioner vllm` asks for it
(`pip install vllm`). Written against vLLM's documented offline chat API
(`LLM.chat` with OpenAI-style messages carrying the image as a data URL); not run
by our CPU test suite. Prompts come from --long-prompt / --short-prompt.
"""
from __future__ import annotations

import base64
import io


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class VLLMCaptioner:
    name = "vllm"

    def __init__(self, model: str, long_prompt: str, short_prompt: str, max_tokens: int = 256):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise SystemExit("--captioner vllm needs vLLM on a GPU machine: pip install vllm") from e
        self.llm = LLM(model=model, limit_mm_per_prompt={"image": 1})
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        self.prompts = {"long": long_prompt, "short": short_prompt}

    def __call__(self, images, items) -> list[dict[str, str]]:
        out = [dict() for _ in images]
        for name, prompt in self.prompts.items():
            convs = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(im)}},
                                                   {"type": "text", "text": prompt}]}] for im in images]
            for caps, res in zip(out, self.llm.chat(convs, self.params)):
                caps[name] = res.outputs[0].text.strip()
        return out
