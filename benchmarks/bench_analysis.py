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
``analyze`` call alone, the process's CPU time (user + system) and its peak RSS (``ru_maxrss``).

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
    "t = time.perf_counter()\n"
    "table = analysis.analyze(sys.argv[2], {'vlm': sys.argv[3], 'code': sys.argv[4]}, densities=(0.2,),\n"
    "                         chunk_mb=float(sys.argv[5]), log=None)\n"
    "seconds = time.perf_counter() - t\n"
    "ok = table[table.status == 'ok']\n"
    "print(json.dumps({'seconds': seconds, 'tensors': len(ok), 'skipped': int((table.status != 'ok').sum()),\n"
    "                  'entries': float(ok.numel.sum())}), file=sys.stderr)\n"
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
                    extra = f"  analyze() {r['seconds']:6.2f} s" if "seconds" in r else ""
                    print(f"[{size}] rep {rep} {name:<11} {r['wall']:6.2f} s  cpu {r['cpu']:6.2f} s{extra}  "
                          f"peak RSS {r['maxrss'] / 2**30:5.2f} GiB  load {r['load']:.2f}", flush=True)
            med = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
            best = {k: min(r.get("seconds", r["wall"]) for r in v) for k, v in results.items()}
            call = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items() if "seconds" in v[0]}
            rss = {k: statistics.median(r["maxrss"] for r in v) for k, v in results.items()}
            cpu = {k: statistics.median(r["cpu"] for r in v) for k, v in results.items()}
            load = statistics.mean(r["load"] for v in results.values() for r in v)
            info = results["analyze_vlm"][0]
            rows.append((size, sizes, med, call, best, cpu, rss, load, info))
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print()
    print("Medians over the repeats, and the best (least disturbed) run: on a shared machine the best run is the\n"
          "closest to what an idle machine does. 'call' is the analyze() call alone (imports excluded).")
    print("| size | trio | inputs | raw read: wall / CPU | analyze process: wall / CPU | analyze() call | "
          "call / read (median) | best call / best read | CPU ratio (process) | peak RSS | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, sizes, med, call, best, cpu, rss, load, _ in rows:
        for trio, read, ana in (("LM trio", "read", "analyze"), ("VLM trio", "read_vlm", "analyze_vlm")):
            nbytes = sizes["lm" if trio == "LM trio" else "vlm"]
            print(f"| {size} | {trio} | {nbytes / 1e9:.2f} GB | {med[read]:.2f} s / {cpu[read]:.2f} s | "
                  f"{med[ana]:.2f} s / {cpu[ana]:.2f} s | {call[ana]:.2f} s | {call[ana] / med[read]:.2f} | "
                  f"{best[ana]:.2f} / {best[read]:.2f} = {best[ana] / best[read]:.2f} | {cpu[ana] / cpu[read]:.2f} | "
                  f"{rss[ana] / 2**30:.2f} GiB | {load:.2f} |")
    for size, *_, info in rows:
        print(f"{size}: VLM trio: {info['tensors']} tensors analysed ({info['entries'] / 1e6:.0f} M entries per model), "
              f"{info['skipped']} skipped (the vision tower: only in the VLM)")


if __name__ == "__main__":
    main()
