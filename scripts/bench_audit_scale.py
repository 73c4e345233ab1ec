"""Benchmark jobs.audit at scale: wall time and peak memory per phase on N synthetic faces.

    python scripts/bench_audit_scale.py --lfw /tmp/study/lfw --work /tmp/audit_scale --faces 1000000 \\
        --json docs/results/bench_audit_scale.json

The synthetic dataset is a real facemill dataset (a Delta records table of face rows): identities of
1-20 faces (mean 10.5), each face's embedding its identity's random unit centre plus noise (same-person
cosine about 0.6, as SFace on LFW), and each face's crop, box, score and landmarks those of a real LFW
face (cycled over ``--crops`` of them), so the scan decodes real JPEG crops. Then ``jobs.audit --cluster``
runs on the embedded local Ray while this script samples the resident memory of the job's whole process
tree (driver, Ray workers, object store) every 0.5 s; the phases' times come from the audit's summary.

Target (issue 13): the whole audit of 1M faces in <= 15 min on this 2-core box.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import schemas as S  # noqa: E402
from workers import dataset, delta  # noqa: E402
from workers.records import image_ids  # noqa: E402

TARGET_S = 15 * 60
SHARD = 10_000
SPREAD = 0.85     # noise norm over centre norm: cosine to the centre 0.76, between faces 0.58


def synthetic(lfw: str, root: str, faces: int, crops: int, seed: int = 0) -> dict:
    """Write the synthetic dataset; returns its shape."""
    from deltalake import write_deltalake

    rng = np.random.default_rng(seed)
    real = dataset.read_table(lfw, S.FACES, columns=[S.BOX, S.SCORE, S.LANDMARKS, S.CROP]).slice(0, crops)
    sizes = rng.integers(1, 21, size=faces // 5 + 10)
    codes = np.repeat(np.arange(len(sizes)), sizes)[:faces]
    groups = int(codes.max() + 1)
    centres = rng.normal(size=(groups, S.EMBEDDING_DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    dataset.create_dataset(root, S.EMBEDDING_DIM)
    schema = S.records_schema(S.EMBEDDING_DIM)
    for start in range(0, faces, SHARD):
        stop = min(faces, start + SHARD)
        n = stop - start
        noise = rng.normal(size=(n, S.EMBEDDING_DIM)).astype(np.float32) * (SPREAD / np.sqrt(S.EMBEDDING_DIM))
        emb = centres[codes[start:stop]] + noise
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        pick = pa.array(np.arange(start, stop) % real.num_rows)
        src = real.take(pick)
        uris = [f"synthetic://p{c:07d}/{i:08d}.jpg" for c, i in zip(codes[start:stop], range(start, stop))]
        shard = f"{start // SHARD:06d}"
        cols = {S.IMAGE_ID: pa.array(image_ids(uris)), S.URI: pa.array(uris),
                S.IDENTITY: pa.array([f"p{c:07d}" for c in codes[start:stop]]), S.SHARD: pa.array([shard] * n),
                S.FACE_INDEX: pa.array(np.zeros(n, np.int32)), S.SETTINGS: pa.array(["synthetic"] * n),
                S.RUN_ID: pa.array(["synthetic"] * n), S.BOX: src.column(S.BOX), S.SCORE: src.column(S.SCORE),
                S.LANDMARKS: src.column(S.LANDMARKS), S.CROP: src.column(S.CROP),
                S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), S.EMBEDDING_DIM),
                S.EMBEDDER: pa.array(["synthetic"] * n), S.EMBEDDER_VERSION: pa.array(["1"] * n)}
        table = pa.table({f.name: cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in schema})
        write_deltalake(delta.table_uri(dataset.records_uri(root)), table.cast(schema), mode="append")
    return {"faces": faces, "identities": groups, "crops_cycled": real.num_rows, "shards": -(-faces // SHARD)}


class TreeMemory:
    """Samples the summed RSS of a process and its descendants (psutil) until stopped."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.samples, self._stop = psutil.Process(pid), [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.samples.append((time.time(), total))
            self._stop.wait(0.5)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lfw", required=True, help="a prepared LFW (its crops are cycled)")
    p.add_argument("--work", required=True)
    p.add_argument("--faces", type=int, default=1_000_000)
    p.add_argument("--crops", type=int, default=4000)
    p.add_argument("--local-cpus", type=int, default=2)
    p.add_argument("--generate-only", action="store_true", help="write the synthetic dataset, audit nothing")
    p.add_argument("--dataset", default="", help="audit this prepared dataset instead (e.g. LFW), no synthetic one")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    root, out = f"{args.work}/dataset-{args.faces}", f"{args.work}/audit-{args.faces}"
    t0 = time.time()
    shape = json.loads(Path(root, "shape.json").read_text()) if Path(root, "shape.json").exists() else None
    if args.dataset:
        faces = dataset.read_table(args.dataset, S.FACES, columns=[S.IDENTITY])
        root, out = args.dataset, f"{args.work}/audit-{Path(args.dataset).name}"
        shape = {"faces": faces.num_rows, "identities": len(set(faces.column(S.IDENTITY).to_pylist())),
                 "dataset": args.dataset}
    if shape is None:
        shape = synthetic(args.lfw, root, args.faces, args.crops)
        Path(root, "shape.json").write_text(json.dumps(shape))
        shape["generate_s"] = round(time.time() - t0, 1)
        Path(root, "shape.json").write_text(json.dumps(shape))
    if args.generate_only:
        print(f"{root}: {shape}")
        return
    cmd = [sys.executable, "-m", "jobs.audit", "--dataset", root, "--output", out, "--cluster",
           "--local-cpus", str(args.local_cpus)]
    start = time.time()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        watch = TreeMemory(proc.pid)
        rc = proc.wait()
        samples = watch.stop()
    wall = time.time() - start
    if rc:
        sys.exit(f"error: the audit failed ({rc}); see {out}.log")
    summary = json.loads(Path(out, "summary.json").read_text())
    phases, edge = {}, start + max(0.0, wall - summary["wall_time_s"])   # start-up before run_audit's clock
    phases["startup"] = (start, edge)
    for name, secs in summary["times_s"].items():
        phases[name.removesuffix("_s")] = (edge, edge + secs)
        edge += secs
    phases["write+report"] = (edge, start + wall)
    rows = []
    for name, (a, b) in phases.items():
        inside = [m for t, m in samples if a <= t <= b] or [0]
        rows.append({"phase": name, "wall_s": round(b - a, 1), "peak_rss_mb": round(max(inside) / 2**20)})
    result = {"shape": shape, "command": " ".join(cmd), "wall_s": round(wall, 1), "target_s": TARGET_S,
              "pass": wall <= TARGET_S, "peak_rss_mb": round(max(m for _, m in samples) / 2**20),
              "phases": rows, "flagged": summary["flagged"], "clusters": summary.get("clusters")}
    print(f"\naudit of {shape['faces']:,} faces ({shape['identities']:,} identities; {shape.get('dataset', 'synthetic')}), local Ray "
          f"{args.local_cpus} CPUs")
    print(f"{'phase':<14} {'wall s':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['phase']:<14} {r['wall_s']:>8} {r['peak_rss_mb']:>12}")
    print(f"{'total':<14} {result['wall_s']:>8} {result['peak_rss_mb']:>12}   target <= {TARGET_S} s: "
          f"{'ok' if result['pass'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
