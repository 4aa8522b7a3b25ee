"""One all-reduce across every process of a torchrun job (gloo backend, CPU only).

Run it on every node with ``TRAINENV_DISTRIBUTION=torchrun``: trainenv starts
``python -m torch.distributed.run`` there, which starts ``NPROC_PER_NODE`` copies of this
script. Each process joins the process group, adds ``rank + 1`` across the whole job and
prints one JSON line: its ranks, the sum (``world * (world + 1) / 2`` when every process
took part) and the node-level variables trainenv exported. ``--fail-rank N`` makes rank N
exit 1 after joining, to see a failure reach every node.

    TRAINENV_DISTRIBUTION=torchrun TRAINENV_ENTRY_POINT=torch_allreduce.py trainenv train
"""

import argparse
import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

NODE_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "NPROC_PER_NODE", "PET_NODE_RANK",
                  "PET_NNODES", "PET_NPROC_PER_NODE", "TRAINENV_NODE_RANK", "TF_CONFIG", "OMP_NUM_THREADS")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank exits 1 after joining")
    parser.add_argument("--timeout", type=float, default=120, help="seconds a collective may wait")
    options, _ = parser.parse_known_args()  # trainenv appends every hyperparameter

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=options.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == options.fail_rank:
        print(f"rank {rank}: failing on purpose (--fail-rank)", file=sys.stderr, flush=True)
        sys.exit(1)
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    line = json.dumps({
        "rank": rank,
        "world": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "node": int(os.environ["GROUP_RANK"]),
        "sum": value.item(),
        "host": socket.gethostname(),
        "time": time.time(),
        "env": {name: os.environ.get(name) for name in NODE_VARIABLES},
    })
    sys.stdout.write(line + "\n")  # one write per line: lines of processes sharing stdout do not interleave
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
