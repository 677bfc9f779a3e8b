"""Benchmark: streamed weight-delta analysis against a raw read of the same inputs.

A script, not a test. It reuses the merge benchmark's generator (``bench_merge.make_trio``): random
bf16 checkpoints with the real tensor names and shapes of Qwen2.5-0.5B (or 1.5B), as a trio
``base`` / ``code`` (Qwen2 layout) and ``vlm`` (Qwen2.5-VL with its vision tower, memory layout,
sharded), plus ``vlm_lm`` (the VLM's language model alone). Then, alternating, ``--repeats`` times
(medians reported), each in its own process on a hot page cache:

- ``read``: a raw read of the LM trio's files (``base``, ``code``, ``vlm_lm``), the floor;
- ``analyze``: ``viscodex_lite.analysis.analyze`` on the LM trio at TIES density 0.2;
- ``read_vlm`` / ``analyze_vlm``: the same for the real job, base + code + the VLM (the analysis
  reads only the VLM's language-model tensors; its vision tower is reported as skipped).

Reported per run: the process's wall time (start-up and imports included), the time of the
first ``analyze`` call (it also imports pandas and loads the cached numba kernels: a fixed ~0.3–0.6 s)
and of a second, identical call in the same process (the steady state, what grows with model size),
the process's CPU time (user + system, both calls) and its peak RSS (``ru_maxrss``).

    nice -n 10 python benchmarks/bench_analysis.py --sizes 0.5B --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_merge import RAW_READ, SIZES, make_trio, measure, weight_files  # noqa: E402

# Both scripts end by printing their own CPU time (user + system) to stderr: on a shared machine the
# wall time depends on the neighbours, the CPU time much less.
CPU = ("import resource as _r; _u = _r.getrusage(_r.RUSAGE_SELF)\n"
       "print('{\"cpu\": %.3f}' % (_u.ru_utime + _u.ru_stime), file=sys.stderr)\n")
READ = RAW_READ + CPU
ANALYZE = (
    "import json, sys, time, torch\n"
    "torch.set_num_threads(int(sys.argv[1]))\n"
    "from viscodex_lite import analysis\n"
    "def call():\n"
    "    t = time.perf_counter()\n"
    "    table = analysis.analyze(sys.argv[2], {'vlm': sys.argv[3], 'code': sys.argv[4]}, densities=(0.2,),\n"
    "                             chunk_mb=float(sys.argv[5]), log=None)\n"
    "    return time.perf_counter() - t, table\n"
    "seconds, table = call()\n"
    "again, _ = call()\n"
    "ok = table[table.status == 'ok']\n"
    "print(json.dumps({'seconds': seconds, 'again': again, 'tensors': len(ok),\n"
    "                  'skipped': int((table.status != 'ok').sum()), 'entries': float(ok.numel.sum())}), file=sys.stderr)\n"
) + CPU


def with_cpu(r: dict) -> dict:
    """Add the JSON lines the child printed last on stderr to its measurement."""
    for line in r["stderr"].strip().splitlines()[-2:]:
        if line.startswith("{"):
            r.update(json.loads(line))
    return r


def run_analyze(d: Path, vlm: str, threads: int, chunk_mb: float, env: dict) -> dict:
    return with_cpu(measure([sys.executable, "-c", ANALYZE, str(threads), str(d / "base"), str(d / vlm), str(d / "code"),
                             str(chunk_mb)], env))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.5B"], choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the analysis process")
    ap.add_argument("--chunk-mb", type=float, default=32.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/viscodex-bench-analysis"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    try:
        for size in args.sizes:
            d = make_trio(size, args.workdir)
            lm_files = [f for m in ("base", "code", "vlm_lm") for f in weight_files(d / m)]
            vlm_files = [f for m in ("base", "code", "vlm") for f in weight_files(d / m)]
            sizes = {"lm": sum(os.path.getsize(f) for f in lm_files), "vlm": sum(os.path.getsize(f) for f in vlm_files)}
            runs = {
                "read": lambda: with_cpu(measure([sys.executable, "-c", READ, *lm_files], env)),
                "analyze": lambda: run_analyze(d, "vlm_lm", args.threads, args.chunk_mb, env),
                "read_vlm": lambda: with_cpu(measure([sys.executable, "-c", READ, *vlm_files], env)),
                "analyze_vlm": lambda: run_analyze(d, "vlm", args.threads, args.chunk_mb, env),
            }
            runs["read_vlm"]()  # warm the page cache
            results: dict[str, list[dict]] = {k: [] for k in runs}
            names = list(runs)
            for rep in range(args.repeats):
                for name in names[rep % len(names):] + names[: rep % len(names)]:
                    r = runs[name]()
                    results[name].append(r)
                    extra = f"  analyze() {r['seconds']:6.2f} s, again {r['again']:6.2f} s" if "seconds" in r else ""
                    print(f"[{size}] rep {rep} {name:<11} {r['wall']:6.2f} s  cpu {r['cpu']:6.2f} s{extra}  "
                          f"peak RSS {r['maxrss'] / 2**30:5.2f} GiB  load {r['load']:.2f}", flush=True)
            med = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
            call = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items() if "seconds" in v[0]}
            again = {k: statistics.median(r["again"] for r in v) for k, v in results.items() if "again" in v[0]}
            best = {k: min(r.get("again", r["wall"]) for r in v) for k, v in results.items()}
            rss = {k: statistics.median(r["maxrss"] for r in v) for k, v in results.items()}
            cpu = {k: statistics.median(r["cpu"] for r in v) for k, v in results.items()}
            load = statistics.mean(r["load"] for v in results.values() for r in v)
            info = results["analyze_vlm"][0]
            rows.append((size, sizes, med, call, again, best, cpu, rss, load, info))
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print()
    print("Medians over the repeats; 'first' is the analyze() call in a fresh process (pandas import and numba cache\n"
          "load included), 'again' the same call repeated in that process. Raw read: one process reading the same\n"
          "files with readinto (a memcpy from the hot page cache). 'best' pairs the least disturbed runs.")
    print("| size | trio | inputs | raw read: wall / CPU | analyze() first / again | again / read | first / read | "
          "best again / best read | process CPU (2 calls) | peak RSS | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, sizes, med, call, again, best, cpu, rss, load, _ in rows:
        for trio, read, ana in (("LM trio", "read", "analyze"), ("VLM trio", "read_vlm", "analyze_vlm")):
            nbytes = sizes["lm" if trio == "LM trio" else "vlm"]
            print(f"| {size} | {trio} | {nbytes / 1e9:.2f} GB | {med[read]:.2f} s / {cpu[read]:.2f} s | "
                  f"{call[ana]:.2f} s / {again[ana]:.2f} s | {again[ana] / med[read]:.2f} | {call[ana] / med[read]:.2f} | "
                  f"{best[ana]:.2f} / {best[read]:.2f} = {best[ana] / best[read]:.2f} | {cpu[ana]:.2f} s | "
                  f"{rss[ana] / 2**30:.2f} GiB | {load:.2f} |")
    for size, *_, info in rows:
        print(f"{size}: VLM trio: {info['tensors']} tensors analysed ({info['entries'] / 1e6:.0f} M entries per model), "
              f"{info['skipped']} skipped (the vision tower: only in the VLM)")


if __name__ == "__main__":
    main()
