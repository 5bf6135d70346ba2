import subprocess
import sys
import time


from conftest import ROOT, fault_env, tiny_overrides


def train_cmd(tmp_path, shapes_dir, **extra):
    return [sys.executable, str(ROOT / "train_stage1.py"), *tiny_overrides(tmp_path, shapes_dir, **extra)]


def start(cmd, cwd, save_pause: float = 0):
    """Start ``cmd``; with ``save_pause`` every checkpoint save stalls that long (tests/faults)."""
    return subprocess.Popen(cmd, cwd=cwd, env=fault_env(save_pause, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc, needle: str, timeout: float = 120.0) -> list[str]:
    """Read the process's output until a line contains ``needle``; returns the lines read."""
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}:\n" + "".join(lines[-40:]))
