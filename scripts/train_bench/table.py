"""The benchmark's printed tables."""
from __future__ import annotations

import statistics

from train_bench.config import ANCHOR_RATIO_TARGET, NOTE, RSS_SLACK


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _s(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_tables(results: list[dict], a: dict | None) -> None:
    print("\n" + NOTE)
    head = (f"{'size':>8} {'faces':>8} {'ids':>7} {'share MB':>9} {'worker peak MB':>15} {'over share':>10} "
            f"{'target MB':>9} {'driver MB':>9} {'1st step s':>10} {'samples/s':>9}  rss  1st  done")
    print(head + "\n" + "-" * len(head))
    for r in results:
        ok, run, share = {k: "ok" if v else "FAIL" for k, v in r["pass"].items()}, r["run"], min(r["share_bytes"])
        over = max(run["worker_peak_rss"]) - share if run["worker_peak_rss"] else None
        print(f"{r['size']:>8} {r['faces']:>8} {r['identities']:>7} {_mb(share):>9} "
              f"{'/'.join(_mb(x) for x in run['worker_peak_rss']) or '-':>15} {_mb(over):>10} "
              f"{_mb(share + RSS_SLACK):>9} "
              f"{_mb(run['driver_peak_rss']):>9} {_s(run['time_to_first_step_s']):>10} {_s(run['samples_per_s']):>9}"
              f"  {ok['worker_rss']:>4} {ok['first_step']:>4} {ok['completes']:>4}")
    if a:
        print(f"\nanchor at LFW size: worker 0 of {a['workers']} ({a['faces_in_shard']} faces), {a['steps']} steps "
              f"of {a['batch']}, {a['cpus']} CPU(s), {a['torch_threads']} torch / {a['decode_threads']} decode threads")
        print(f"{'path':>10} {'held MB':>8} {'load s':>7} {'samples/s min..median..max':>28} {'vs in-memory':>18}")
        low, high = a["ratio_range"]
        for name in ("in_memory", "streaming"):
            v = a["samples_per_s"][name]
            rel = "1.00" if name == "in_memory" else f"{a['ratio_median']:.2f} ({low:.2f}..{high:.2f})"
            print(f"{name:>10} {_mb(a['held_bytes'][name]):>8} {a['load_s'][name]:>7.1f} "
                  f"{f'{min(v):.1f}..{statistics.median(v):.1f}..{max(v):.1f}':>28} {rel:>18}")
        print(f"target streaming / in-memory >= {ANCHOR_RATIO_TARGET}: {'ok' if a['pass'] else 'FAIL'}; "
              f"this process's peak RSS over both paths: {_mb(a['process_peak_rss'])} MB")
