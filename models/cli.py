"""The ``--help`` format every entry point shares (here at the bottom layer, which every entry point may import)."""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description's examples as written, and every option's default where it has one: not for
    required arguments or None (the help says what None means), nor twice where the help names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.required or "default" in text:
            return text
        return super()._get_help_string(action)
