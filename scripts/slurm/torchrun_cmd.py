"""Build (or run) the torchrun command for this SLURM node, from SLURM's environment.

    python scripts/slurm/torchrun_cmd.py [--gpus-per-node N] [--port P] [--exec] -- train_stage1.py overrides...

One task per node runs this; every node computes the same rendezvous endpoint (the
first host of SLURM_JOB_NODELIST) and its own node rank (SLURM_NODEID). Nothing
about the cluster is baked in: account, partition and paths come from sbatch's
own options or environment (SBATCH_ACCOUNT, SBATCH_PARTITION, ...).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's examples as written, and every option's default."""


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'gpu[01-03,07],cpu5' -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", spec):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def torchrun_command(env: dict[str, str], script_and_args: list[str], gpus_per_node: int | None = None, port: int = 29500) -> list[str]:
    try:
        nodes = expand_hostlist(env["SLURM_JOB_NODELIST"])
        nnodes = int(env.get("SLURM_NNODES", len(nodes)))
        node_rank = int(env["SLURM_NODEID"])
        job_id = env["SLURM_JOB_ID"]
    except KeyError as e:
        raise SystemExit(f"{e.args[0]} is not set: run this inside a SLURM allocation (sbatch / srun)") from e
    gpus = gpus_per_node or int(env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE", "1").split(":")[-1])
    return [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={gpus}",
        f"--node_rank={node_rank}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={nodes[0]}:{port}",
        f"--rdzv_id={job_id}",
        *script_and_args,
    ]


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--gpus-per-node", type=int, default=None, help="default: SLURM_GPUS_ON_NODE")
    ap.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    ap.add_argument("--exec", action="store_true", help="replace this process with torchrun instead of printing")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- train_stageN.py [overrides]")
    args = ap.parse_args(argv)
    command = [c for c in args.command if c != "--"] or ["train_stage1.py"]
    cmd = torchrun_command(dict(os.environ), command, args.gpus_per_node, args.port)
    if args.exec:
        os.execvp(cmd[0], cmd)
    print(shlex.join(cmd))
    return cmd


if __name__ == "__main__":
    main(sys.argv[1:])
