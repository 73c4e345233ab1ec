"""Time to the first committed shard, and the speed after it, of ``python -m jobs.prepare`` on an embedded Ray.

    python scripts/bench_first_commit.py --manifest /tmp/ftc/lfw2000.csv --config default= \\
        --config "s128=--shard-size 128" --repeat 3 --json docs/results/bench_first_commit.json

Each run starts ``python -m jobs.prepare --input MANIFEST --output <tmp> --local-cpus N <config args>`` as a
child process (so Ray's start-up is counted, as a user sees it) and afterwards reads each commit's time from
the records Delta table's history (one commit per shard; the images each commit added from the table at
that version). Per run:

* ``first_commit_s``: from starting the child to the first shard's commit (``graph_start_s``: to prepare's
  "N to do in M shards" line, printed once Ray is up and the work is planned, just before the graph runs);
* ``steady_img_s``: images committed after the first commit / (last commit - first commit);
* ``overall_img_s``: images / (last commit - start), and ``wall_s`` the child's whole life (its report,
  vacuum and Ray shut-down included);
* ``stage_img_s`` (``--stage-images N``): the face stage alone, measured in this process between runs on
  the first N images of the manifest: ``decode_shard`` + one ``FaceActor`` call as a plain class (no Ray), with
  the actor's torch threads (``--local-cpus``). ``overall / stage`` is the share of the stage's speed that
  the whole run kept.

The configurations take turns inside each repeat (the box is shared and noisy); before each timed run the
script waits (up to ``--wait-max`` s) for the 1-minute load to drop below ``--load-max`` and records the load.
Prints a Markdown table (ranges over the repeats) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python scripts/bench_first_commit.py", description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, help="CSV manifest (uri, identity) of the images")
    p.add_argument("--config", action="append", default=[], metavar="LABEL=ARGS",
                   help="a configuration: a label and the extra jobs.prepare arguments (repeatable)")
    p.add_argument("--checkout", action="append", default=[], metavar="LABEL=PATH",
                   help="run configuration LABEL from another copy of facemill (e.g. `git archive` of an older "
                        "commit): its jobs.prepare, on PYTHONPATH for the driver and the Ray workers")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the configurations take turns in each")
    p.add_argument("--local-cpus", type=int, default=2, help="CPUs of the embedded local Ray")
    p.add_argument("--stage-images", type=int, default=256, help="images of the stage-speed reference (0: none)")
    p.add_argument("--load-max", type=float, default=2.5, help="wait while the 1-minute load is above this")
    p.add_argument("--wait-max", type=float, default=600.0, help="longest wait for the load, seconds")
    p.add_argument("--timeout", type=float, default=900.0, help="kill a run after this many seconds")
    p.add_argument("--keep", type=Path, default=None, help="keep each run's dataset and logs under this folder")
    p.add_argument("--json", type=Path, default=Path("bench_first_commit.json"))
    p.add_argument("--table", action="store_true", help="only print the table of an earlier --json")
    args = p.parse_args(argv)
    if args.manifest is None and not args.table:
        p.error("--manifest is required (unless --table)")
    configs = []
    for spec in args.config or ["default="]:
        label, sep, rest = spec.partition("=")
        if not sep or not label:
            p.error(f"--config must be LABEL=ARGS, got {spec!r}")
        configs.append((label, shlex.split(rest)))
    args.configs = configs
    args.checkouts = {}
    for spec in args.checkout:
        label, sep, path = spec.partition("=")
        if not sep or label not in dict(configs) or not (Path(path) / "jobs" / "prepare.py").is_file():
            p.error(f"--checkout must be LABEL=PATH of a configured label and a facemill copy, got {spec!r}")
        args.checkouts[label] = str(Path(path).resolve())
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    return args


def load1() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_for_quiet(limit: float, wait_max: float, log) -> dict:
    """Wait (60 s steps, at most ``wait_max``) for the 1-minute load to fall to ``limit``."""
    waited, load = 0.0, load1()
    while load > limit and waited < wait_max:
        log(f"  load {load:.2f} > {limit:g}: waiting 60 s")
        time.sleep(60)
        waited += 60
        load = load1()
    return {"load_1min": load, "waited_s": waited}


def commit_times(records: str) -> list[tuple[float, int]]:
    """(commit time in epoch seconds, images in the table after it) per commit of the records table."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    import schemas as S

    dt = DeltaTable(records)
    out = []
    for entry in sorted(dt.history(), key=lambda e: e["version"]):
        if entry.get("operation") != "WRITE":
            continue
        dt.load_as_version(entry["version"])
        n = dt.to_pyarrow_dataset().count_rows(filter=pc.field(S.FACE_INDEX) == -1)
        out.append((entry["timestamp"] / 1000.0, int(n)))
    return out


def run_prepare(manifest: Path, extra: list[str], local_cpus: int, workdir: Path, timeout: float,
                checkout: str | None = None) -> dict:
    """One ``jobs.prepare`` child (from ``checkout`` where given): its timestamped output lines, exit code,
    wall time and commits."""
    output = workdir / "out"
    cmd = [sys.executable, "-m", "jobs.prepare", "--input", str(manifest), "--output", str(output),
           "--local-cpus", str(local_cpus), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    t0 = time.time()
    child = subprocess.Popen(cmd, cwd=checkout or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time() - t0, ln.rstrip()) for ln in child.stdout),
                              daemon=True)
    reader.start()
    try:
        rc = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        rc = child.wait()
    wall = time.time() - t0
    reader.join(5)
    (workdir / "prepare.log").write_text("".join(f"{t:8.2f} {ln}\n" for t, ln in lines))
    summary = next((json.loads(ln) for _, ln in reversed(lines) if ln.startswith("{")), None)
    graph = next((t for t, ln in lines if " to do in " in ln), None)
    commits = commit_times(str(output / "records")) if rc == 0 else []
    return {"cmd": cmd[1:], "checkout": checkout, "rc": rc, "wall_s": wall, "graph_start_s": graph, "summary": summary,
            "commits": [(round(t - t0, 3), n) for t, n in commits]}


def measures(run: dict) -> dict:
    """first_commit_s, steady and overall img/s of one run (None where it committed nothing)."""
    commits = run["commits"]
    if not commits:
        return {"first_commit_s": None, "last_commit_s": None, "images": 0, "commits": 0,
                "steady_img_s": None, "overall_img_s": None}
    (t1, n1), (tn, n) = commits[0], commits[-1]
    return {"first_commit_s": t1, "first_commit_images": n1, "last_commit_s": tn, "images": n,
            "commits": len(commits), "steady_img_s": (n - n1) / (tn - t1) if tn > t1 else None,
            "overall_img_s": n / tn}


def stage_speed(manifest: Path, n: int, threads: int) -> dict:
    """The face stage alone on the manifest's first ``n`` images: decode + one FaceActor call, no Ray."""
    import pandas as pd

    from workers.actors import ActorConfig, FaceActor, decode_shard
    from workers.decode import DecodeConfig

    uris = pd.read_csv(manifest)["uri"].tolist()[:n]
    actor = FaceActor(ActorConfig(device="cpu", torch_threads=threads))

    def one(part: list[str]) -> float:
        row = {"shard": "s", "uris": part, "identities": [None] * len(part), "fingerprints": [None] * len(part)}
        t = time.perf_counter()
        decoded = decode_shard(row, storage_options=None, decode=DecodeConfig())
        actor({k: [v] for k, v in decoded.items()})
        return time.perf_counter() - t

    one(uris[:16])  # warm-up
    seconds = one(uris)
    return {"images": len(uris), "seconds": round(seconds, 3), "img_s": len(uris) / seconds}


def _range(values, spec="{:.1f}") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi, med = min(vals), max(vals), statistics.median(vals)
    return spec.format(med) if lo == hi else f"{spec.format(med)} ({spec.format(lo)}-{spec.format(hi)})"


def print_table(results: dict) -> None:
    stage = [s["img_s"] for s in results["stage"]]
    print(f"\nmedian (min-max) over {results['args']['repeat']} round(s); stage alone: {_range(stage)} img/s")
    head = ("| config | prepare args | load (1 min) | graph starts s | first commit s | after the graph starts s "
            "| images in it | steady img/s | overall img/s | overall / steady | overall / stage | wall s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, extra in results["configs"].items():
        runs = [r for r in results["runs"] if r["config"] == label]
        ratio_stage = [r["overall_img_s"] / r["stage_img_s"] if r["overall_img_s"] and r.get("stage_img_s") else None
                       for r in runs]
        ratio_steady = [r["overall_img_s"] / r["steady_img_s"] if r["overall_img_s"] and r["steady_img_s"] else None
                        for r in runs]
        after_graph = [r["first_commit_s"] - r["graph_start_s"] if r["first_commit_s"] and r["graph_start_s"] else None
                       for r in runs]
        loads = _range([r["load"]["load_1min"] for r in runs], "{:.2f}")
        print(f"| {label} | `{' '.join(extra) or '(defaults)'}` | {loads} "
              f"| {_range([r['graph_start_s'] for r in runs])} | {_range([r['first_commit_s'] for r in runs])} "
              f"| {_range(after_graph)} "
              f"| {_range([r.get('first_commit_images') for r in runs], '{:.0f}')} "
              f"| {_range([r['steady_img_s'] for r in runs])} | {_range([r['overall_img_s'] for r in runs])} "
              f"| {_range(ratio_steady, '{:.2f}')} | {_range(ratio_stage, '{:.2f}')} "
              f"| {_range([r['wall_s'] for r in runs])} |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table:
        results = json.loads(args.json.read_text())
        print_table(results)
        return results
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    kept = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("configs", "checkouts")}
    results = {"args": kept,
               "configs": {label: extra for label, extra in args.configs}, "checkouts": args.checkouts, "machine": {
                   "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}, "runs": [], "stage": []}
    root = Path(tempfile.mkdtemp(prefix="bench_first_commit_")) if args.keep is None else args.keep
    try:
        for rnd in range(args.repeat):
            stage = None
            if args.stage_images:
                load = wait_for_quiet(args.load_max, args.wait_max, log)
                stage = {**stage_speed(args.manifest, args.stage_images, args.local_cpus), "round": rnd, "load": load}
                results["stage"].append(stage)
                log(f"round {rnd}: stage alone {stage['img_s']:.1f} img/s (load {load['load_1min']:.2f})")
            for label, extra in args.configs:
                load = wait_for_quiet(args.load_max, args.wait_max, log)
                workdir = root / f"{label}-{rnd}"
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir(parents=True)
                run = run_prepare(args.manifest, extra, args.local_cpus, workdir, args.timeout,
                                  args.checkouts.get(label))
                m = measures(run)
                rec = {"config": label, "round": rnd, "load": load, "load_after": load1(), **m, **run,
                       "stage_img_s": stage["img_s"] if stage else None}
                results["runs"].append(rec)
                log(f"round {rnd} {label}: rc {run['rc']}, first commit {m['first_commit_s']} s "
                    f"({m.get('first_commit_images')} images), steady {m['steady_img_s'] or 0:.1f} img/s, overall "
                    f"{m['overall_img_s'] or 0:.1f} img/s, wall {run['wall_s']:.1f} s (load {load['load_1min']:.2f})")
                if args.keep is None:
                    shutil.rmtree(workdir / "out", ignore_errors=True)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1, default=str))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(results)
    log(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
