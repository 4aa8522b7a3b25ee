"""One allreduce across every rank of an Open MPI job (mpi4py).

Run it with ``TRAINENV_DISTRIBUTION=mpi`` on every node: node 0's trainenv runs ``mpirun``
over all the hosts, the other nodes' trainenv waits until that job ends and exits with its
status. Each rank adds ``rank + 1`` across the job and prints one JSON line: its rank, the
sum (``size * (size + 1) / 2`` when every rank took part), its host and the hyperparameters
it received from trainenv (``TRAINENV_HPS``, exported to every host with ``mpirun -x``).
``--fail-rank N`` makes rank N raise before the allreduce.

A rank that dies while the others wait in a collective must end the whole job, or the others
wait forever: an exception is caught here and turned into ``MPI_Abort`` (``python -m mpi4py
script.py`` does the same for any script); a crash or ``os._exit`` is noticed by ``mpirun``.

    TRAINENV_DISTRIBUTION=mpi TRAINENV_ENTRY_POINT=mpi_allreduce.py trainenv train
"""

import argparse
import json
import os
import socket
import sys
import traceback

from mpi4py import MPI


def run(comm, options):
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == options.fail_rank:
        raise RuntimeError(f"rank {rank} fails on purpose (--fail-rank)")
    total = comm.allreduce(rank + 1)
    line = json.dumps({
        "rank": rank,
        "world": size,
        "local_rank": int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "-1")),
        "sum": total,
        "host": socket.gethostname(),
        "hyperparameters": json.loads(os.environ.get("TRAINENV_HPS", "null")),
        "node_rank_variable": os.environ.get("TRAINENV_NODE_RANK"),
    })
    sys.stdout.write(line + "\n")  # one write per line: lines of processes sharing stdout do not interleave
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank raises before the allreduce")
    options, _ = parser.parse_known_args()  # trainenv appends every hyperparameter
    comm = MPI.COMM_WORLD
    try:
        run(comm, options)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)  # end every rank on every host, not only this one


if __name__ == "__main__":
    main()
