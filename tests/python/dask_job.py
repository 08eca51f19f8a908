"""Dask client used by the end-to-end tests and scripts/demo.

  dask_job.py workers SCHEDULER              -> JSON: {"workers": n, "names": [...]}
  dask_job.py wordcount SCHEDULER FILE [N]   -> JSON: {"counts": {...}, "workers": n}

`wordcount` is a real map/reduce on the cluster: the text file's lines are
spread over N partitions, split into words on the workers (map) and the
per-word counts are combined (reduce) by dask.bag.
"""
import json
import sys

from dask.distributed import Client
import dask.bag as db


def main():
    mode, scheduler = sys.argv[1], sys.argv[2]
    with Client(scheduler, timeout="30s") as client:
        info = client.scheduler_info(n_workers=-1)
        workers = info["workers"]
        names = sorted(str(w.get("name")) for w in workers.values())
        if mode == "workers":
            print(json.dumps({"workers": len(workers), "names": names}))
            return
        if mode == "wordcount":
            path = sys.argv[3]
            partitions = int(sys.argv[4]) if len(sys.argv) > 4 else 8
            with open(path) as f:
                lines = f.read().splitlines()
            bag = db.from_sequence(lines, npartitions=partitions)
            counts = dict(bag.map(str.split).flatten().frequencies().compute())
            print(json.dumps({"counts": counts, "workers": len(workers)}))
            return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
