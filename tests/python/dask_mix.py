"""A Dask job mix for a ddisco Dask cluster: what its users run, timed.

  dask_mix.py groupby SCHEDULER ROWS PARTITIONS
      A dataframe of ROWS generated rows (4 columns of 8 bytes: `key`, 100
      values; `user`, 1,000,000 values; `x`, a float; `y`, an int) in
      PARTITIONS partitions, generated on the workers (the stand-in for
      reading S3: the client sends no data), persisted, then grouped two
      ways: by `key` (a tree reduction) and by `user` (a shuffle between
      the workers, `split_out`). Every aggregate is checked against the
      same data generated again on the client and reduced with numpy.
      -> JSON {"rows", "mb", "generate_s", "groupby_key_s", "groupby_user_s",
               "groups_key", "groups_user", "workers"}

  dask_mix.py map SCHEDULER N
      `client.map` of N small tasks (each squares its number), gathered
      and checked: -> JSON {"tasks", "seconds", "tasks_per_s", "workers"}

  dask_mix.py hold SCHEDULER N KIB HOLDER
      N tasks each return KIB KiB of generated numbers; once all are held
      in the workers' memory, a task on the worker named HOLDER (the
      master's: it is not the one lost) takes their futures and waits.
      Prints {"phase": "held", "on": {worker name: results held}} and
      reads a line from stdin: the caller loses a slave meanwhile. Then
      the waiting task gathers every result (Dask makes the lost ones
      again from their tasks) and returns their checksum and who made
      each, checked here. `gather_s`: from the line read to the task's
      result; `remade`: results made by a worker other than the one that
      held them; `held_on_lost`: results the lost workers held.
      -> JSON {"phase": "done", "results", "checksum_ok", "lost_workers",
               "held_on_lost", "remade", "gather_s"}

`groupby` needs pandas and pyarrow on the nodes: `dask_extras = ["dataframe"]`.
The scheduler speaks mutual TLS only: DDISCO_DASK_TLS names the folder of
`ddisco-controller credentials --out` (as for dask_job.py).
"""
import json
import os
import sys
import time

import numpy as np
from dask.distributed import Client, Event, wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dask_job import security  # noqa: E402

KEYS = 100
USERS = 1_000_000
SEED = 2024


def generate(i, rows):
    """Partition i of the generated table: the same on any machine."""
    import pandas as pd

    rng = np.random.default_rng([SEED, i])
    return pd.DataFrame(
        {
            "key": rng.integers(0, KEYS, rows),
            "user": rng.integers(0, USERS, rows),
            "x": rng.random(rows),
            "y": rng.integers(0, 1000, rows),
        }
    )


def sizes(rows, partitions):
    base, extra = divmod(rows, partitions)
    return [base + (1 if i < extra else 0) for i in range(partitions)]


def groupby(client, rows, partitions):
    import dask.dataframe as dd

    parts = sizes(rows, partitions)
    t0 = time.monotonic()
    df = dd.from_map(generate, range(partitions), parts).persist()
    wait(df)
    t1 = time.monotonic()
    by_key = df.groupby("key").agg({"x": "sum", "y": "sum", "user": "count"}).compute()
    t2 = time.monotonic()
    by_user = df.groupby("user").y.sum(split_out=partitions // 4 or 1).compute()
    t3 = time.monotonic()

    # The same data again, on the client, reduced with numpy.
    want_x = np.zeros(KEYS)
    want_y = np.zeros(KEYS, dtype=np.int64)
    want_n = np.zeros(KEYS, dtype=np.int64)
    want_user = np.zeros(USERS, dtype=np.int64)
    for i, n in enumerate(parts):
        p = generate(i, n)
        k = p["key"].to_numpy()
        want_x += np.bincount(k, weights=p["x"].to_numpy(), minlength=KEYS)
        want_y += np.bincount(k, weights=p["y"].to_numpy(), minlength=KEYS).astype(np.int64)
        want_n += np.bincount(k, minlength=KEYS)
        want_user += np.bincount(p["user"].to_numpy(), weights=p["y"].to_numpy(), minlength=USERS).astype(
            np.int64
        )
    by_key = by_key.sort_index()
    present = want_n > 0
    assert list(by_key.index) == list(np.flatnonzero(present)), "groupby(key): wrong groups"
    assert (by_key["user"].to_numpy() == want_n[present]).all(), "groupby(key): wrong counts"
    assert (by_key["y"].to_numpy() == want_y[present]).all(), "groupby(key): wrong sums of y"
    assert np.allclose(by_key["x"].to_numpy(), want_x[present], rtol=1e-9), "groupby(key): wrong sums of x"
    seen = np.bincount(np.concatenate([generate(i, n)["user"].to_numpy() for i, n in enumerate(parts)]),
                       minlength=USERS) > 0
    by_user = by_user.sort_index()
    assert list(by_user.index) == list(np.flatnonzero(seen)), "groupby(user): wrong groups"
    assert (by_user.to_numpy() == want_user[seen]).all(), "groupby(user): wrong sums of y"
    return {
        "rows": rows,
        "mb": round(rows * 32 / 1e6, 1),
        "generate_s": round(t1 - t0, 2),
        "groupby_key_s": round(t2 - t1, 2),
        "groupby_user_s": round(t3 - t2, 2),
        "groups_key": len(by_key),
        "groups_user": len(by_user),
    }


def square(i):
    return i * i


def many(client, n):
    t0 = time.monotonic()
    futures = client.map(square, range(n))
    got = client.gather(futures)
    seconds = time.monotonic() - t0
    assert got == [i * i for i in range(n)], "client.map: wrong results"
    return {"tasks": n, "seconds": round(seconds, 2), "tasks_per_s": round(n / seconds, 1)}


def numbers(i, kib):
    return np.random.default_rng([SEED, 7, i]).integers(0, 1 << 20, kib * 128, dtype=np.int64)


def chunk(i, kib):
    """A result to hold: KIB KiB of numbers, and the worker that made it.
    The 50 ms sleep stands in for reading its input (S3)."""
    from distributed import get_worker

    time.sleep(0.05)
    return str(get_worker().name), numbers(i, kib)


def hold_all(dataset, holding, gate):
    """Holds the futures published as `dataset` (how Dask hands futures to
    another client) until `gate` is set, then gathers them."""
    from distributed import get_client, secede

    client = get_client()
    futures = client.get_dataset(dataset)
    secede()  # waiting here must not take a thread the results may need
    Event(holding, client=client).set()
    Event(gate, client=client).wait(timeout=600)
    made = client.gather(futures)
    return [name for name, _ in made], sum(int(a.sum()) for _, a in made)


def hold(client, n, kib, holder):
    import uuid

    workers = client.scheduler_info(n_workers=-1)["workers"]
    addr = [a for a, w in workers.items() if str(w.get("name")) == holder]
    if not addr:
        raise SystemExit(f"no worker named {holder!r}: {sorted(str(w.get('name')) for w in workers.values())}")
    futures = client.map(chunk, range(n), kib=kib)
    wait(futures)
    names = {a: str(w.get("name")) for a, w in workers.items()}
    on = {}
    who_has = client.who_has(futures)
    for addrs in who_has.values():
        for a in addrs:
            on[names.get(a, a)] = on.get(names.get(a, a), 0) + 1
    dataset, holding, gate = (f"{what}-{uuid.uuid4().hex}" for what in ("held", "holding", "gate"))
    client.publish_dataset(futures, name=dataset)
    held = client.submit(hold_all, dataset, holding, gate, workers=addr, pure=False)
    if not Event(holding, client=client).wait(timeout=120):
        raise SystemExit("the holding task never started")
    print(json.dumps({"phase": "held", "on": on}), flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    Event(gate, client=client).set()
    makers, total = held.result(timeout=600)
    seconds = time.monotonic() - t0
    client.unpublish_dataset(dataset)
    want = sum(int(numbers(i, kib).sum()) for i in range(n))
    now = {str(w.get("name")) for w in client.scheduler_info(n_workers=-1)["workers"].values()}
    gone = sorted(set(names.values()) - now)
    # A result made again was made by another worker than the one that held it.
    first = {k: {names.get(a, a) for a in addrs} for k, addrs in who_has.items()}
    remade = sum(1 for f, maker in zip(futures, makers) if maker not in first[f.key])
    return {"phase": "done", "results": n, "checksum_ok": total == want, "lost_workers": gone,
            "held_on_lost": sum(on.get(w, 0) for w in gone), "remade": remade,
            "gather_s": round(seconds, 2)}


def main():
    mode, scheduler = sys.argv[1], sys.argv[2]
    timeout = os.environ.get("DDISCO_DASK_TIMEOUT", "30s")
    with Client(scheduler, timeout=timeout, security=security()) as client:
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        if mode == "groupby":
            out = groupby(client, int(sys.argv[3]), int(sys.argv[4]))
        elif mode == "map":
            out = many(client, int(sys.argv[3]))
        elif mode == "hold":
            out = hold(client, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        out["workers"] = workers
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
