"""The SLURM launcher's torchrun command, built from a fake 2-node x 4-GPU allocation (no SLURM needed)."""
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "slurm"))
from torchrun_cmd import expand_hostlist, torchrun_command  # noqa: E402


def test_hostlist_expansion():
    assert expand_hostlist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("a[8-10]") == ["a8", "a9", "a10"]


@pytest.mark.parametrize("node_id", [0, 1])
def test_two_nodes_four_gpus(node_id):
    env = {"SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_NNODES": "2", "SLURM_NODEID": str(node_id),
           "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4"}
    cmd = torchrun_command(env, ["train_stage1.py", "data=imagenet"], port=29511)
    assert cmd == ["torchrun", "--nnodes=2", "--nproc_per_node=4", f"--node_rank={node_id}", "--rdzv_backend=c10d",
                   "--rdzv_endpoint=gpu12:29511", "--rdzv_id=4242", "train_stage1.py", "data=imagenet"]


def test_outside_slurm_is_a_clear_error():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/slurm/torchrun_cmd.py"), "--", "train_stage1.py"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "SLURM_JOB_NODELIST is not set: run this inside a SLURM allocation" in proc.stderr


def test_sbatch_script_requeues_on_the_trainers_preemption_code():
    from training.guards import PREEMPTED_EXIT_CODE

    text = (ROOT / "scripts/slurm/train.sbatch").read_text()
    assert f"if [ $rc -eq {PREEMPTED_EXIT_CODE} ]" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "#SBATCH --account" not in text and "#SBATCH --partition" not in text  # nothing cluster-specific baked in
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts/slurm/train.sbatch")]).returncode == 0
