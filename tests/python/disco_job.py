"""A Disco client, run on a Disco cluster's master node (as a user runs jobs
there, over SSH): Disco hands out result URLs with the nodes' host names,
which resolve on the nodes.

The client is the cluster's own build (/opt/disco/lib, the same Disco
version as the master and the workers). It is put on sys.path, not on
PYTHONPATH: Disco ships to the workers every module found through
PYTHONPATH, and the job module (Disco's own examples/util/wordcount.py)
must be among them, the disco package must not.

Usage (JSON on stdout):
  count INPUT...         Disco's WordCount over the inputs:
                         {"job", "counts": {word: n}, "hosts": [hosts that ran tasks]}
  sortcount INPUT...     a word count with sort=True (the reduce's input sorted
                         on disk by Unix sort, as Disco's sorted jobs do; keys
                         are bytes, as Disco's external sort requires): the
                         same, plus "keys", the reduce's keys in its output order
  submit SECS INPUT...   Disco's WordCount with a map that sleeps SECS per
                         input, submitted without waiting: {"job": name}
  wait JOB               waits for a job: {"job", "counts", "hosts"}
  unresolvable TAG       pulls a copy of TAG whose blobs list first a replica
                         on a host that does not resolve (a lost node):
                         {"secs", "blobs", "first": that replica}
  put TAG NAME TEXT      a blob into DDFS under TAG: {"urls": [[replica URL, ...]]}
  putfile TAG PATH       a file (on this node) into DDFS under TAG: the same
  get TAG                the tag's blobs, read back: {"blobs": [text], "replicas": [n]}
  connected N [SECS]     waits (default 60 s) until the master has N nodes
                         connected (its Erlang on each, so DDFS can place every
                         replica): {"nodes": [host]}; exit status 1 on timeout
"""
import json
import os
import sys

sys.path.append("/opt/disco/lib")

from disco.core import Disco, result_iterator  # noqa: E402
from disco.ddfs import DDFS  # noqa: E402


def sorted_map(line, params):
    for word in line.split():
        yield (word if isinstance(word, bytes) else word.encode()), 1


def sorted_reduce(iter, params):
    from disco.util import kvgroup

    # No sorted(): the input comes sorted, or the groups split.
    for word, counts in kvgroup(iter):
        yield word, sum(counts)


def count(inputs, sort=False):
    if sort:
        from disco.core import Job

        job = Job().run(input=inputs, map=sorted_map, reduce=sorted_reduce, sort=True)
    else:
        from wordcount import WordCount

        job = WordCount().run(input=inputs)
    results = job.wait(show=False)
    counts = {}
    keys = []
    for word, n in result_iterator(results):
        # Words read from DDFS blobs are bytes; from raw:// inputs, str.
        word = word.decode() if isinstance(word, bytes) else word
        keys.append(word)
        counts[word] = counts.get(word, 0) + n
    out = {"job": job.name, "counts": counts, "hosts": job_hosts(job.name)}
    if sort:
        out["keys"] = keys
    return out


def slow_map(line, params):
    import time

    time.sleep(params)
    for word in line.split():
        yield word, 1


def submit(secs, *inputs):
    from disco.core import Job
    from disco.worker.classic.func import sum_reduce

    job = Job().run(input=list(inputs), map=slow_map, reduce=sum_reduce, params=float(secs))
    return {"job": job.name}


def wait(name):
    results = Disco().wait(name, show=False)
    counts = {}
    for word, n in result_iterator(results):
        word = word.decode() if isinstance(word, bytes) else word
        counts[word] = counts.get(word, 0) + int(n)
    return {"job": name, "counts": counts, "hosts": job_hosts(name)}


def unresolvable(tag):
    """A copy of TAG whose blobs each list first a replica on a host that
    does not resolve (a lost node), pulled with replicas in that order."""
    import random
    import re
    import time

    ddfs = DDFS()
    gone = [[re.sub(r"^(\w+://)[^/:]+", r"\1gone-node", repl[0])] + repl for repl in ddfs.urls(tag)]
    ddfs.tag(tag + ":gone", gone)
    random.shuffle = lambda x: None  # pull tries the replicas in order
    start = time.time()
    blobs = [blob.read().decode() for blob in ddfs.pull(tag + ":gone")]
    return {"secs": round(time.time() - start, 2), "blobs": blobs, "first": gone[0][0]}


def job_hosts(name):
    hosts = set()
    for _, (_, _, message) in Disco().events(name):
        if " assigned to " in message:
            hosts.add(message.rsplit(" assigned to ", 1)[1].strip('"'))
    return sorted(hosts)


def put(tag, name, text):
    path = os.path.join("/tmp", name)
    with open(path, "w") as f:
        f.write(text)
    _, urls = DDFS().push(tag, [(path, name)])
    return {"urls": urls}


def putfile(tag, path):
    _, urls = DDFS().push(tag, [path])
    return {"urls": urls}


def get(tag):
    ddfs = DDFS()
    blobs = [blob.read().decode() for blob in ddfs.pull(tag)]
    replicas = [len(r) for r in ddfs.urls(tag)]
    return {"blobs": blobs, "replicas": replicas}


def connected(n, secs=60):
    import time

    end = time.time() + float(secs)
    while True:
        try:
            info = Disco().nodeinfo()
        except Exception as e:  # the master is still starting
            info = {"error": str(e)}
        hosts = sorted(h for h, i in info.items() if isinstance(i, dict) and i.get("connected"))
        if len(hosts) >= int(n):
            return {"nodes": hosts}
        if time.time() > end:
            print(json.dumps({"timeout": True, "nodeinfo": info}))
            sys.exit(1)
        time.sleep(0.2)


if __name__ == "__main__":
    op, args = sys.argv[1], sys.argv[2:]
    if op in ("count", "sortcount"):
        out = count(args, sort=op == "sortcount")
    else:
        ops = {
            "put": put,
            "putfile": putfile,
            "get": get,
            "connected": connected,
            "submit": submit,
            "wait": wait,
            "unresolvable": unresolvable,
        }
        out = ops[op](*args)
    print(json.dumps(out))
