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
  put TAG NAME TEXT      a blob into DDFS under TAG: {"urls": [[replica URL, ...]]}
  putfile TAG PATH       a file (on this node) into DDFS under TAG: the same
  get TAG                the tag's blobs, read back: {"blobs": [text], "replicas": [n]}
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
    hosts = set()
    for _, (_, _, message) in Disco().events(job.name):
        if " assigned to " in message:
            hosts.add(message.rsplit(" assigned to ", 1)[1].strip('"'))
    out = {"job": job.name, "counts": counts, "hosts": sorted(hosts)}
    if sort:
        out["keys"] = keys
    return out


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


if __name__ == "__main__":
    op, args = sys.argv[1], sys.argv[2:]
    if op in ("count", "sortcount"):
        out = count(args, sort=op == "sortcount")
    else:
        out = {"put": put, "putfile": putfile, "get": get}[op](*args)
    print(json.dumps(out))
