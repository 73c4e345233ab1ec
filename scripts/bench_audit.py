"""Benchmark jobs.audit on known faults: precision/recall per finding, beside fastdup and dlib in one run.

    python scripts/bench_audit.py --work /tmp/audit_bench --lfw /tmp/study/lfw \\
        --fastdup-python /tmp/fdvenv/bin/python --json docs/results/bench_audit.json

1. ``scripts/audit_faults.py`` injects faults into LFW (seeded): 2 % of the images of identities with >= 4
   images relabelled, 1 % of the images near-copied (JPEG 40, 0.6x, 10 % crop, mirror, all four), half of
   the copies under another identity; ``jobs.prepare --select center`` prepares the manifest (reused
   when ``<work>/dataset`` is complete), ``jobs.audit --against pairs.txt`` audits it.
2. Label suspects: recall over the relabelled faces, precision over the flagged faces, where a flag is
   right if the face was relabelled or is a copy under another identity (it is mislabelled too).
3. Near-duplicates: recall over the injected (copy, original) pairs; precision over the flagged pairs
   that involve a copy (pairs of two LFW originals are LFW's own; they are listed, not scored). The
   anchor, fastdup (run as its documentation says: ``fastdup.create(work_dir, input_dir).run()`` on the
   image files, in its own venv), is scored the same way at the threshold that gives our precision.
4. Clusters: ``jobs.audit --cluster`` on the LFW dataset given by ``--lfw`` (labels hidden) against
   ``dlib.chinese_whispers_clustering`` on the same embeddings (best of a threshold sweep): pairwise
   and BCubed F.
5. Quality: error-versus-reject on LFW pairs: FNMR at FMR = 1e-3 (threshold fixed on all pairs) after
   dropping the lowest x % of images by quality, against random rejection (mean of 20 draws).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import schemas as S  # noqa: E402
from scripts.audit_faults import inject  # noqa: E402
from workers import dataset  # noqa: E402
from workers.audit.cluster_metrics import bcubed_scores, pairwise_scores  # noqa: E402
from workers.audit.store import read_audit, read_summary  # noqa: E402

A = S.audit
REJECT = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
CW_THRESHOLDS = (0.45, 0.5, 0.55, 0.6, 0.65)


def sh(cmd: list[str], log: Path) -> float:
    """Run a command (its output to ``log``); returns its wall time. Exits on failure."""
    t0 = time.time()
    with open(log, "w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed ({rc}); see {log}")
    return time.time() - t0


def pair_set(a, b) -> set[frozenset]:
    return {frozenset(p) for p in zip(a, b)}


def score_labels(output: str, truth: dict) -> dict:
    labels = read_audit(output, A.AUDIT_LABELS).to_pandas()
    relabelled = {r["uri"] for r in truth["relabelled"]}
    conflicts = {c["copy"] for c in truth["copies"] if not c["same_identity"]}
    flagged = set(labels.loc[labels[A.FLAGGED], S.URI])
    right = flagged & (relabelled | conflicts)
    others = labels[labels[A.FLAGGED] & ~labels[S.URI].isin(relabelled | conflicts)]
    return {"relabelled": len(relabelled), "flagged": len(flagged), "recall": len(flagged & relabelled) / len(relabelled),
            "precision": len(right) / max(1, len(flagged)), "conflict_copies_found": len(flagged & conflicts),
            "lfw_own": others[[S.URI, S.IDENTITY, A.OTHER_IDENTITY, A.OWN_COSINE, A.OTHER_COSINE]]
            .sort_values(A.OTHER_COSINE, ascending=False).to_dict("records")}


def score_pairs(pairs: set[frozenset], truth: dict) -> dict:
    """Recall over the injected pairs; precision over the pairs that involve a copy."""
    true = pair_set([c["copy"] for c in truth["copies"]], [c["original"] for c in truth["copies"]])
    copies = {c["copy"] for c in truth["copies"]}
    with_copy = {p for p in pairs if p & copies}
    hit = pairs & true
    return {"injected": len(true), "found": len(hit), "recall": len(hit) / len(true),
            "flagged_with_copy": len(with_copy), "precision": len(hit) / max(1, len(with_copy)),
            "lfw_own_pairs": len(pairs - with_copy)}


def score_duplicates(output: str, truth: dict) -> tuple[dict, pd.DataFrame]:
    dups = read_audit(output, A.AUDIT_DUPLICATES).to_pandas()
    inner = dups[dups[A.KIND] != A.DUP_LEAK]
    flagged = inner[inner[A.FLAGGED]]
    result = score_pairs(pair_set(flagged[S.URI + "_a"], flagged[S.URI + "_b"]), truth)
    result["by_transform"] = {}
    found = pair_set(flagged[S.URI + "_a"], flagged[S.URI + "_b"])
    for c in truth["copies"]:
        row = result["by_transform"].setdefault(c["transform"], [0, 0])
        row[0] += frozenset((c["copy"], c["original"])) in found
        row[1] += 1
    own = flagged[~flagged[S.URI + "_a"].str.contains("/copies/") & ~flagged[S.URI + "_b"].str.contains("/copies/")]
    return result, own


def run_fastdup(python: str, files: list[str], work: Path) -> pd.DataFrame:
    """fastdup's similarity pairs (uri_a, uri_b, similarity) over ``files``, k = 10, similarity >= 0.5."""
    listing = work / "fastdup_files.txt"
    listing.write_text("\n".join(files) + "\n")
    out = work / "fastdup_similarity.csv"
    code = ("import fastdup, sys\n"
            f"fd = fastdup.create(work_dir={str(work / 'fastdup')!r}, input_dir={str(listing)!r})\n"
            "fd.run(overwrite=True, threshold=0.5, nearest_neighbors_k=10, num_threads=2)\n"
            "s = fd.similarity()\n"
            f"s[['filename_from', 'filename_to', 'distance']].to_csv({str(out)!r}, index=False)\n")
    sh([python, "-c", code], work / "fastdup.log")
    s = pd.read_csv(out)
    return s.rename(columns={"filename_from": "a", "filename_to": "b", "distance": "similarity"})


def fastdup_at_precision(sim: pd.DataFrame, truth: dict, precision: float) -> dict:
    """fastdup's recall at the lowest threshold whose precision (our definition) is >= ``precision``."""
    best = None
    for threshold in np.round(np.arange(0.80, 1.0001, 0.0025), 4):
        keep = sim[sim["similarity"] >= threshold]
        r = score_pairs(pair_set(keep["a"], keep["b"]), truth)
        if r["precision"] >= precision and (best is None or r["recall"] > best["recall"]):
            best = {**r, "threshold": float(threshold)}
    return best or {"recall": 0.0, "precision": None, "threshold": None}


def cluster_scores(lfw: str, output: str, work: Path) -> dict:
    import dlib

    clusters = read_audit(output, A.AUDIT_CLUSTERS).to_pandas()
    faces = dataset.read_table(lfw, S.FACES, columns=[S.IMAGE_ID, S.FACE_INDEX, S.EMBEDDING])
    faces = faces.to_pandas().merge(clusters[[S.IMAGE_ID, S.FACE_INDEX, S.IDENTITY, A.CLUSTER]],
                                    on=[S.IMAGE_ID, S.FACE_INDEX])
    labels = faces[S.IDENTITY].to_numpy()
    ours = {"pairwise": pairwise_scores(faces[A.CLUSTER], labels), "bcubed": bcubed_scores(faces[A.CLUSTER], labels)}
    vectors = [dlib.vector(list(map(float, e))) for e in faces[S.EMBEDDING]]
    sweep = {}
    for t in CW_THRESHOLDS:   # cosine t on unit vectors = euclidean sqrt(2 - 2t)
        t0 = time.time()
        cw = np.asarray(dlib.chinese_whispers_clustering(vectors, float(np.sqrt(2 - 2 * t))))
        sweep[t] = {"pairwise": pairwise_scores(cw, labels), "bcubed": bcubed_scores(cw, labels),
                    "clusters": int(len(set(cw))), "wall_s": round(time.time() - t0, 1)}
    best_p = max(sweep.values(), key=lambda r: r["pairwise"]["f"])
    best_b = max(sweep.values(), key=lambda r: r["bcubed"]["f"])
    return {"ours": ours, "clusters": int(clusters[A.CLUSTER].nunique()), "chinese_whispers": sweep,
            "cw_best_pairwise_f": best_p["pairwise"]["f"], "cw_best_bcubed_f": best_b["bcubed"]["f"],
            "better_on_both": ours["pairwise"]["f"] > best_p["pairwise"]["f"]
            and ours["bcubed"]["f"] > best_b["bcubed"]["f"]}


def reject_curve(lfw: str, output: str, pairs_path: str) -> dict:
    from workers.audit.against import lfw_keys
    from workers.evaluation.verification import IMAGE1, IMAGE2, SAME, lookup_pairs, read_pairs

    quality = read_audit(output, A.AUDIT_QUALITY).to_pandas()
    faces = dataset.read_table(lfw, S.FACES, columns=[S.IMAGE_ID, S.FACE_INDEX, S.URI, S.EMBEDDING]).to_pandas()
    faces = faces[faces[S.FACE_INDEX] == 0].merge(quality[[S.IMAGE_ID, A.SCORE_]], on=S.IMAGE_ID)
    pairs = read_pairs(pairs_path)
    i1, i2, ok = lookup_pairs(pairs[[IMAGE1, IMAGE2]], lfw_keys(faces[S.URI]))
    i1, i2, same = i1[ok], i2[ok], pairs[SAME].to_numpy()[ok]
    emb = np.stack(faces[S.EMBEDDING].to_numpy())
    scores = np.einsum("nd,nd->n", emb[i1], emb[i2])
    impostor = np.sort(scores[~same])[::-1]
    threshold = impostor[max(0, int(np.ceil(1e-3 * len(impostor))) - 1)]

    def fnmr(q: np.ndarray, x: float) -> float:
        cut = np.quantile(q, x)
        keep = same & (q[i1] > cut) & (q[i2] > cut)
        return float((scores[keep] <= threshold).mean())

    q = faces[A.SCORE_].to_numpy() + 1e-9 * np.arange(len(faces))   # ties broken by row
    rng = np.random.default_rng(0)
    randoms = [rng.random(len(faces)) for _ in range(20)]
    rows = [{"reject": x, "fnmr_quality": fnmr(q, x), "fnmr_random": float(np.mean([fnmr(r, x) for r in randoms]))}
            for x in REJECT]
    return {"fnmr_at_0": fnmr(q, 0.0), "curve": rows,
            "below_random_everywhere": all(r["fnmr_quality"] < r["fnmr_random"] for r in rows)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "lfw" / "images"))
    p.add_argument("--pairs", default=str(ROOT.parent / "shared" / "data" / "lfw" / "pairs.txt"))
    p.add_argument("--lfw", required=True, help="LFW prepared with --select center (clusters, quality)")
    p.add_argument("--fastdup-python", default="", help="python of a venv with fastdup (empty: skip the anchor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-cpus", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    truth = inject(args.images, str(work / "faults"), args.seed) if not (work / "faults" / "truth.json").exists() \
        else json.loads((work / "faults" / "truth.json").read_text())
    data, audit, lfw_audit = str(work / "dataset"), str(work / "audit"), str(work / "lfw_audit")
    times = {}
    done = os.path.exists(os.path.join(data, "summary.json"))
    if not done:
        times["prepare_s"] = sh([py, "-m", "jobs.prepare", "--input", str(work / "faults" / "manifest.csv"),
                                 "--output", data, "--select", "center", "--local-cpus", str(args.local_cpus)],
                                work / "prepare.log")
    times["audit_s"] = sh([py, "-m", "jobs.audit", "--dataset", data, "--output", audit, "--against", args.pairs,
                           "--local-cpus", str(args.local_cpus)], work / "audit.log")
    times["audit_lfw_s"] = sh([py, "-m", "jobs.audit", "--dataset", args.lfw, "--output", lfw_audit, "--cluster",
                               "--against", args.pairs, "--local-cpus", str(args.local_cpus)], work / "audit_lfw.log")
    result = {"truth": {"images": truth["images"], "relabelled": len(truth["relabelled"]),
                        "copies": len(truth["copies"]), "seed": truth["seed"]},
              "summary": read_summary(audit), "summary_lfw": read_summary(lfw_audit), "times_s": times}
    result["labels"] = score_labels(audit, truth)
    result["duplicates"], own = score_duplicates(audit, truth)
    result["duplicates"]["lfw_own"] = own[[S.URI + "_a", S.URI + "_b", A.KIND, A.COSINE, A.PIXEL_SIMILARITY]] \
        .sort_values(A.PIXEL_SIMILARITY, ascending=False).to_dict("records")
    if args.fastdup_python:
        t0 = time.time()
        files = pd.read_csv(work / "faults" / "manifest.csv")["uri"].tolist()
        sim = run_fastdup(args.fastdup_python, files, work)
        result["fastdup"] = {**fastdup_at_precision(sim, truth, result["duplicates"]["precision"]),
                             "wall_s": round(time.time() - t0, 1)}
    result["clusters"] = cluster_scores(args.lfw, lfw_audit, work)
    result["quality"] = reject_curve(args.lfw, lfw_audit, args.pairs)
    lab, dup, clu, qual = result["labels"], result["duplicates"], result["clusters"], result["quality"]
    print(f"\n{'finding':<28} {'recall':>7} {'precision':>9}   target")
    print(f"{'label suspects':<28} {lab['recall']:>7.3f} {lab['precision']:>9.3f}   >= 0.90 / 0.90  "
          f"({lab['flagged']} flagged, {lab['relabelled']} relabelled, {len(lab['lfw_own'])} LFW's own)")
    print(f"{'near-duplicates (facemill)':<28} {dup['recall']:>7.3f} {dup['precision']:>9.3f}   >= 0.95 / 0.95  "
          f"({dup['found']}/{dup['injected']}; {dup['lfw_own_pairs']} LFW pairs of its own)")
    if "fastdup" in result:
        fd = result["fastdup"]
        print(f"{'near-duplicates (fastdup)':<28} {fd['recall']:>7.3f} {fd['precision'] or 0:>9.3f}   "
              f"at threshold {fd['threshold']}; ratio of recalls {dup['recall'] / max(fd['recall'], 1e-9):.2f}")
    print("by transform: " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in dup["by_transform"].items()))
    print(f"\nclusters on LFW (labels hidden): ours pairwise F {clu['ours']['pairwise']['f']:.4f}, BCubed F "
          f"{clu['ours']['bcubed']['f']:.4f}; Chinese whispers best {clu['cw_best_pairwise_f']:.4f} / "
          f"{clu['cw_best_bcubed_f']:.4f}; better on both: {clu['better_on_both']}")
    print(f"\nquality, FNMR at FMR 1e-3 (none rejected: {100 * qual['fnmr_at_0']:.2f} %)")
    print("  reject  " + "  ".join(f"{int(100 * r['reject']):>5}%" for r in qual["curve"]))
    print("  quality " + "  ".join(f"{100 * r['fnmr_quality']:>5.2f}%" for r in qual["curve"]))
    print("  random  " + "  ".join(f"{100 * r['fnmr_random']:>5.2f}%" for r in qual["curve"]))
    print(f"  below random at every x: {qual['below_random_everywhere']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
