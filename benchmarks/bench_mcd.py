"""MCD pipeline speed and memory: the streaming JSON reader against json.load, and the mini-MCD build.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/bench_mcd.py [--records 20000] [--n 3000]

Prints wall time, CPU time and peak RSS of each step, each measured in a fresh child process so
one step's memory does not hide another's. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, os
t, c = time.perf_counter(), time.process_time()
step, arg = sys.argv[1], sys.argv[2]
if step == "json.load":
    n = len(json.load(open(arg, encoding="utf-8")))
elif step == "stream":
    from viscodex_lite.mcd import iter_json_records
    n = sum(1 for _ in iter_json_records(arg))
elif step.startswith("build"):
    from viscodex_lite import mini_mcd
    workers, n_samples, out = int(step[5:]), int(sys.argv[3]), arg
    n = mini_mcd.build(out, n=n_samples, workers=workers, overwrite=True).records
elif step == "load":
    from viscodex_lite import mcd
    n = len(mcd.load(arg, cache_dir=sys.argv[3]))
children = resource.getrusage(resource.RUSAGE_CHILDREN)
self_ = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"records": n, "wall_s": time.perf_counter() - t,
                  "cpu_s": time.process_time() - c + children.ru_utime + children.ru_stime,
                  "peak_rss_mb": max(self_.ru_maxrss, children.ru_maxrss) / 1024}))
"""


def run(*args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg", TQDM_DISABLE="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_release(path: Path, records: int) -> None:
    """A records file shaped like the release: ~3 KB per record (the release averages 1.7 GB / 598k)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(records):
            answer = "<div class=\"card\">" + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(500)) + "</div>"
            record = {"messages": [{"role": "user", "content": "<image>\nWrite the HTML for this page."},
                                   {"role": "assistant", "content": answer}],
                      "images": [f"html_images/{i}.png"], "category": "html"}
            f.write(("\n" if i == 0 else ",\n") + json.dumps(record))
        f.write("\n]\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = tmp / "mcd_598k.json"
        synthetic_release(records, args.records)
        size_mb = records.stat().st_size / 1e6
        print(f"records file: {args.records} records, {size_mb:.0f} MB")
        base = run("json.load", str(records))
        stream = run("stream", str(records))
        for name, r in (("json.load", base), ("iter_json_records", stream)):
            print(f"  {name:18s} {r['wall_s']:6.2f} s  {size_mb / r['wall_s']:6.0f} MB/s  peak RSS {r['peak_rss_mb']:7.0f} MB")
        print(f"  streaming/json.load: time x{stream['wall_s'] / base['wall_s']:.2f}, "
              f"peak memory x{stream['peak_rss_mb'] / base['peak_rss_mb']:.2f}")
        for workers in (1, 2):
            r = run(f"build{workers}", str(tmp / f"mini{workers}"), str(args.n))
            size = sum(p.stat().st_size for p in (tmp / f"mini{workers}").iterdir()) / 1e6
            print(f"build-mini n={args.n} workers={workers}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, "
                  f"{size:.1f} MB, peak RSS {r['peak_rss_mb']:.0f} MB")
        r = run("load", str(tmp / "mini1"), str(tmp / "hf"))
        print(f"mcd.load of the mini-MCD (zip, verify images): {r['wall_s']:.1f} s for {r['records']} records")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
