"""Disco's own integration suite (the `tests/` of the cluster's Disco home),
run module by module against a live master, as a Disco user runs it on the
master: `disco test MODULE` (Disco's CLI, Disco's TestRunner), one process
per module, each with a time limit; the jobs a module leaves behind (a
module killed at its limit, a test that failed half way) are killed before
the next module starts, so that one module's jobs never hold the slots of
the next.

Usage (run on the master, with DISCO_MASTER set; JSON lines on stdout, one
per module, then a summary line):
  disco_suite.py [--limit SECS] [--without-load] [MODULE ...]
                     default: every test_*.py; --without-load leaves out
                     test_50k's 50,000 map tasks (its test_five runs)

Each line: {"module", "result": "pass" | "fail" | "timeout" | "excluded",
"tests", "failures", "errors", "skipped", "secs", "excluded": [[test, why]],
"output": the runner's last lines (not on a pass)}.

Tests that cannot run anywhere today are listed in EXCLUDED with the reason;
the rest of their module runs (`disco test module.Class.test_x ...`).
"""
import json
import os
import re
import subprocess
import sys
import time

HOME = "/opt/disco"
sys.path.append(os.path.join(HOME, "lib"))

# The excluded tests, each with its reason. Nothing else is left out.
CHEKHOV = (
    "reads http://discoproject.org/media/text/chekhov.txt: the site is gone "
    "since the project died, and its assertions count that text's words"
)
EXCLUDED = {
    "test_examples.ExamplesTestCase.test_chunk": CHEKHOV,
    "test_examples.ExamplesTestCase.test_grep": CHEKHOV,
    "test_examples.ExamplesTestCase.test_wordcount": CHEKHOV,
    "test_examples.ExamplesTestCase.test_discodb": CHEKHOV
    + "; and discodb's Python module is written for Python 2's C API only "
    "(PyString_*, PyInt_*): it does not build for Python 3",
    "test_ddfs.DDFSWriteTestCase.test_chunk": CHEKHOV,
}

# Disco's load test: 50,000 map tasks, about 50 minutes on two cores.
LOAD = {
    "test_50k.ManyMapTestCase.test_50k": "Disco's load test (50,000 map tasks): "
    "run on its own (scripts/demo-disco 2 --suite test_50k), its time in BENCHMARKS.md",
}

# Per module limits (seconds) beyond the default: the GC tests wait for
# DDFS's GC after each of their 11 tests; test_pipe moves 10 million records
# through 12 stages, twice; test_50k is the load test.
LIMITS = {"test_gc": 900, "test_pipe": 900, "test_50k": 7200}


def test_names(module):
    """module.Class.test for each test of the module (Disco's loader)."""
    code = (
        "import sys, unittest; sys.path.insert(0, %r); m = %r\n"
        "def walk(s):\n"
        "    for t in s:\n"
        "        yield from (walk(t) if isinstance(t, unittest.TestSuite) else [t])\n"
        "for t in walk(unittest.TestLoader().loadTestsFromName(m)): print(t.id())\n"
    ) % (os.path.join(HOME, "tests"), module)
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.join(HOME, "tests"),
        timeout=60,
    )
    names = out.stdout.split()
    if out.returncode != 0 or any(n.startswith("unittest.loader.") for n in names):
        return None
    return names


def kill_leftovers():
    """Kills every job still active: what a module left behind."""
    from disco.core import Disco

    disco = Disco()
    killed = []
    for _, status, name in disco.joblist():
        if status == "active":
            disco.kill(name)
            killed.append(name)
    return killed


def summary(text):
    """(tests, failures, errors, skipped, ok) from unittest's last lines."""
    ran = re.findall(r"^Ran (\d+) tests? in", text, re.M)
    tests = int(ran[-1]) if ran else 0
    counts = {}
    for key in ("failures", "errors", "skipped"):
        m = re.findall(r"%s=(\d+)" % key, text)
        counts[key] = int(m[-1]) if m else 0
    ok = bool(re.search(r"^OK\b", text, re.M)) and not re.search(r"^FAILED\b", text, re.M)
    return tests, counts["failures"], counts["errors"], counts["skipped"], ok


def run(module, limit, left_out):
    excluded = [[t, why] for t, why in sorted(left_out.items()) if t.startswith(module + ".")]
    names = [module]
    if excluded:
        found = test_names(module)
        # A module that does not import: run it whole, so that its error is
        # what the runner reports.
        names = [module] if found is None else [t for t in found if t not in left_out]
    start = time.time()
    line = {"module": module, "excluded": excluded}
    if not names:
        line.update(result="excluded", tests=0, failures=0, errors=0, skipped=0, secs=0.0)
        return line
    env = dict(os.environ)
    try:
        out = subprocess.run(
            [sys.executable, "-W", "ignore", os.path.join(HOME, "bin", "disco"), "test"] + names,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=limit,
            env=env,
            cwd=HOME,
        )
        text = out.stdout
        tests, failures, errors, skipped, ok = summary(text)
        result = "pass" if ok and out.returncode == 0 and tests > 0 else "fail"
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        tests, failures, errors, skipped, _ = summary(text)
        result = "timeout"
    line.update(
        result=result,
        tests=tests,
        failures=failures,
        errors=errors,
        skipped=skipped,
        secs=round(time.time() - start, 1),
    )
    if result != "pass":
        line["output"] = "\n".join(text.splitlines()[-60:])
    line["killed"] = kill_leftovers()
    return line


def main(argv):
    limit = 240
    left_out = dict(EXCLUDED)
    while argv[:1] in (["--limit"], ["--without-load"]):
        if argv[0] == "--limit":
            limit, argv = int(argv[1]), argv[2:]
        else:
            left_out.update(LOAD)
            argv = argv[1:]
    modules = argv or sorted(
        n[:-3] for n in os.listdir(os.path.join(HOME, "tests")) if n.startswith("test_") and n.endswith(".py")
    )
    kill_leftovers()
    start = time.time()
    results = []
    for module in modules:
        line = run(module, LIMITS.get(module, limit), left_out)
        results.append(line)
        print(json.dumps(line), flush=True)
    passed = [r["module"] for r in results if r["result"] == "pass"]
    print(
        json.dumps(
            {
                "summary": True,
                "modules": len(results),
                "passed": len(passed),
                "failed": [r["module"] for r in results if r["result"] not in ("pass",)],
                "tests": sum(r["tests"] for r in results),
                "secs": round(time.time() - start, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
