"""What the entry points' command lines share (here at the bottom layer, which every entry point may
import, and without torch, so ``--help`` stays fast): the ``--help`` format, the sampling device options."""
import argparse

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # inference/pipeline.py DTYPES maps them to torch dtypes


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description's examples as written, and every option's default where it has one: not for
    required arguments or None (the help says what None means), nor twice where the help names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.required or "default" in text:
            return text
        return super()._get_help_string(action)


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    """--device and --dtype of the commands that sample (inference/pipeline.py Pipeline.load)."""
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES, help="the model's weights while sampling")
