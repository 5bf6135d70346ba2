"""Fault injection for the tests that kill or signal a process at a chosen instant.

Python imports ``sitecustomize`` at start-up from the first folder on its path that has one, so a
test puts this folder first on PYTHONPATH (``tests/conftest.py`` ``fault_env``) and every Python
process it starts, children included, gets these patches; the project's own code has no hooks.

FLOWDIT_TEST_SAVE_PAUSE=s   a checkpoint save stalls s seconds after writing model.safetensors
FLOWDIT_TEST_UNIT_PAUSE=s   a data-preparation unit stalls s seconds before its shard is renamed into place
"""
import os
import time
from pathlib import Path

_save_pause = float(os.environ.get("FLOWDIT_TEST_SAVE_PAUSE") or 0)
_unit_pause = float(os.environ.get("FLOWDIT_TEST_UNIT_PAUSE") or 0)

if _save_pause:
    import models.checkpoint as _checkpoint

    _save_file = _checkpoint.save_file

    def _slow_save_file(tensors, path, *args, **kwargs):
        _save_file(tensors, path, *args, **kwargs)
        if Path(path).name == "model.safetensors":
            time.sleep(_save_pause)

    _checkpoint.save_file = _slow_save_file

if _unit_pause:
    import models.atomic as _atomic

    _commit = _atomic.AtomicFile.commit

    def _slow_commit(self):
        if self.path.name.endswith(".tar"):
            time.sleep(_unit_pause)
        return _commit(self)

    _atomic.AtomicFile.commit = _slow_commit
