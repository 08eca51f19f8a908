"""Dask client used by the end-to-end tests and scripts/demo.

  dask_job.py workers SCHEDULER              -> JSON: {"workers": n, "names": [...]}
  dask_job.py wordcount SCHEDULER FILE [N]   -> JSON: {"counts": {...}, "workers": n}
  dask_job.py sleep SCHEDULER SECONDS        -> JSON: {"slept": s} (a task that sleeps)
  dask_job.py burst SCHEDULER N SECONDS      -> JSON: {"done": n, "workers_seen": w,
                                                "workers_before": b, "on_added": a}
                                                (N tasks sleeping SECONDS each;
                                                `on_added`: tasks that ran on a
                                                worker that joined after submission)
  dask_job.py held-burst SCHEDULER N SECONDS WAIT BEFORE
                                             -> JSON: {"done": n, "workers_seen": w,
                                                "workers_before": b, "on_added": a}
    (waits for the BEFORE workers the cluster has now; then N tasks that
    sleep SECONDS and then wait, all queued, until a worker joins that was
    not there when the burst was submitted, or WAIT seconds pass;
    `on_added` counts the tasks that ran on such a worker. The
    adaptive target sees the queue, and the tasks cannot finish before the
    cluster grew: no race between a node's set-up time and task time.)
  dask_job.py tls-probe tls://HOST:PORT [CERT KEY]
                                             -> JSON: {"refused": bool, "why": "..."}
    (a raw TLS connection, with the client certificate given or none:
    does the scheduler refuse it once the handshake is done?)

`wordcount` is a real map/reduce on the cluster: the text file's lines are
spread over N partitions, split into words on the workers (map) and the
per-word counts are combined (reduce) by dask.bag.

The scheduler speaks mutual TLS only: DDISCO_DASK_TLS names the folder
`ddisco-controller credentials --out` wrote (ca.pem, client.pem,
client.key). DDISCO_DASK_CA_ONLY=1 uses the CA but no client certificate
(what a peer that read the CA from a node's userdata has);
DDISCO_DASK_TIMEOUT bounds the connection (default 30s).
"""
import json
import os
import sys

from dask.distributed import Client
import dask.bag as db


def security():
    folder = os.environ.get("DDISCO_DASK_TLS")
    if not folder:
        return None
    from distributed.security import Security

    if os.environ.get("DDISCO_DASK_CA_ONLY") == "1":
        return Security(tls_ca_file=f"{folder}/ca.pem", require_encryption=True)
    return Security(
        tls_ca_file=f"{folder}/ca.pem",
        tls_client_cert=f"{folder}/client.pem",
        tls_client_key=f"{folder}/client.key",
        require_encryption=True,
    )


def tls_probe(address, cert=None, key=None):
    import socket
    import ssl

    host, port = address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # an attacker need not check the server
    if cert:
        ctx.load_cert_chain(cert, key)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.settimeout(3)
                # TLS 1.3: the server judges the client certificate after
                # the handshake; its verdict arrives on the first read.
                if tls.recv(1):
                    return {"refused": False, "why": "the scheduler answered (its comm handshake)"}
                return {"refused": True, "why": "closed by the scheduler"}
    except socket.timeout:
        return {"refused": False, "why": "the scheduler kept the connection and waits for a message"}
    except (ssl.SSLError, ConnectionError) as e:
        return {"refused": True, "why": f"{type(e).__name__}: {e}"}


def hold(i, secs, gate):
    """A task of the held burst: sleeps, then waits for the gate to open."""
    import time

    from distributed import Event, get_worker

    time.sleep(secs)
    Event(gate).wait(timeout=900)
    return i, get_worker().address


def held_burst(client, n, secs, wait, before_count):
    import time
    import uuid

    from distributed import Event

    # The workers of the nodes ready now: a worker that connects late is
    # not one the cluster grew by.
    client.wait_for_workers(before_count, timeout=wait)
    before = set(client.scheduler_info(n_workers=-1)["workers"])
    # One task through an open gate first: the scheduler learns how long a
    # `hold` task takes (else it assumes 0.5 s and asks for fewer workers).
    open_gate = f"open-{uuid.uuid4().hex}"
    Event(open_gate, client=client).set()
    client.submit(hold, -1, secs, open_gate, pure=False).result()
    gate = f"gate-{uuid.uuid4().hex}"
    futures = [client.submit(hold, i, secs, gate, pure=False) for i in range(n)]
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if set(client.scheduler_info(n_workers=-1)["workers"]) - before:
            break
        time.sleep(0.2)
    Event(gate, client=client).set()
    done = client.gather(futures)
    seen = len(client.scheduler_info(n_workers=-1)["workers"])
    on_added = sum(1 for _, worker in done if worker not in before)
    print(json.dumps({"done": len({i for i, _ in done}), "workers_seen": seen,
                      "workers_before": len(before), "on_added": on_added}))


def main():
    mode, scheduler = sys.argv[1], sys.argv[2]
    if mode == "tls-probe":
        print(json.dumps(tls_probe(scheduler, *sys.argv[3:5])))
        return
    timeout = os.environ.get("DDISCO_DASK_TIMEOUT", "30s")
    with Client(scheduler, timeout=timeout, security=security()) as client:
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
            # The workers once it ran (a cluster just ready may still be
            # connecting its workers when the job starts).
            done_with = len(client.scheduler_info(n_workers=-1)["workers"])
            print(json.dumps({"counts": counts, "workers": done_with}))
            return
        if mode == "burst":
            import time

            from distributed import get_worker

            n, secs = int(sys.argv[3]), float(sys.argv[4])
            before = set(client.scheduler_info(n_workers=-1)["workers"])
            futures = client.map(lambda i: (time.sleep(secs), i, get_worker().address)[1:], range(n), pure=False)
            done = client.gather(futures)
            seen = len(client.scheduler_info(n_workers=-1)["workers"])
            on_added = sum(1 for _, w in done if w not in before)
            print(json.dumps({"done": len({i for i, _ in done}), "workers_seen": seen,
                              "workers_before": len(before), "on_added": on_added}))
            return
        if mode == "held-burst":
            held_burst(client, int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
            return
        if mode == "sleep":
            import time

            secs = float(sys.argv[3])
            print(json.dumps({"slept": client.submit(lambda s: time.sleep(s) or s, secs).result()}))
            return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
