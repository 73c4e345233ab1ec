"""Embedder precision on the LFW protocol: accuracy and speed of float32 against bfloat16/float16, same crops.

    python scripts/bench_precision.py --device cpu --json precision.json                 # all 7,701 images
    python scripts/bench_precision.py --device cpu --folds 2 --json /tmp/quick.json       # first 2 folds only

Detects and aligns every image named in ``pairs.txt`` once (float32, ``FaceEngine.detect_align``), then embeds
the same crops at each ``--precisions`` entry and scores the pairs with the LFW protocol (10 folds; the face
nearest the image centre per image; a missing face counts as a wrong pair, as ``jobs.evaluate`` does).
Prints a table and writes JSON: accuracy, VAL@FAR=1e-3, AUC, embed faces/s, and the cosine between each
precision's embedding of a face and float32's.

The same numbers through the whole pipeline: ``jobs.prepare --embed-precision P`` on a manifest of the
pairs' images, then ``jobs.evaluate`` (that route detects once per precision).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.decode import decode_image  # noqa: E402
from workers.evaluation import verification as V  # noqa: E402
from workers.evaluation.evaluate import (  # noqa: E402
    first_folds, nearest_centre_faces, pair_scores, verification_metrics)
from workers.faces.embedders import embed_crops, load_embedder  # noqa: E402
from workers.faces.engine import EngineConfig, FaceEngine  # noqa: E402
from workers.faces.mtcnn import MTCNN  # noqa: E402

DEFAULT_LFW = REPO.parent / "shared" / "data" / "lfw"


def detect_all(root: Path, keys: list[str], engine: FaceEngine, batch: int, log) -> dict:
    """Crops, boxes, owning image and image sizes of every face in ``keys`` (``<name>/<file>.jpg``)."""
    crops, boxes, owner, sizes = [], [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(keys), batch):
        images = []
        for key in keys[start:start + batch]:
            decoded = decode_image((root / "images" / key).read_bytes())
            if decoded.image is None:
                raise SystemExit(f"error: cannot decode {key}: {decoded.error} {decoded.detail}")
            images.append(decoded.image)
        faces = engine.detect_align(images)
        crops.append(faces.crops), boxes.append(faces.boxes.cpu())
        owner.append(faces.image_index.cpu() + start), sizes.append(faces.sizes.cpu())
        if (start // batch) % 20 == 0:
            log(f"  detected {start + len(images)}/{len(keys)} images")
    return {"crops": torch.cat(crops), "boxes": torch.cat(boxes).numpy(), "owner": torch.cat(owner).numpy(),
            "sizes": torch.cat(sizes).numpy(), "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lfw", type=Path, default=DEFAULT_LFW, help="LFW root holding images/ and pairs.txt")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precisions", default="float32,bfloat16", help="comma-separated; float32 is always run")
    p.add_argument("--batch", type=int, default=64, help="images per detection batch")
    p.add_argument("--embed-batch", type=int, default=0, help="faces per embedder pass (0: by device)")
    p.add_argument("--folds", type=int, default=0, help="score only the first N folds (0: all 10)")
    p.add_argument("--json", type=Path, default=Path("precision.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    precisions = ["float32"] + [x for x in args.precisions.split(",") if x and x != "float32"]

    pairs = V.read_pairs(args.lfw / "pairs.txt")
    if args.folds:
        pairs = first_folds(pairs, args.folds)
    keys = sorted(set(pairs[V.IMAGE1]) | set(pairs[V.IMAGE2]))
    log(f"bench_precision: {len(pairs)} pairs, {len(keys)} images, device {device}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    module = load_embedder("sface", device).module.eval()
    engine = FaceEngine(MTCNN.pretrained(device=device), module, EngineConfig())
    det = detect_all(args.lfw, keys, engine, args.batch, log)
    n_faces = len(det["crops"])
    log(f"  {n_faces} faces in {det['seconds']:.1f} s")
    face_index = np.concatenate([np.arange(c) for c in np.bincount(det["owner"], minlength=len(keys))])
    chosen = nearest_centre_faces(det["owner"], det["boxes"], det["sizes"][det["owner"], 1],
                                  det["sizes"][det["owner"], 0], face_index)
    chosen_keys = np.asarray(keys, dtype=object)[det["owner"][chosen]]

    results, vectors = {}, {}
    for precision in precisions:
        t0 = time.perf_counter()
        with torch.inference_mode():
            emb = embed_crops(engine.embedder, det["crops"], args.embed_batch, precision).cpu().numpy()
        seconds = time.perf_counter() - t0
        vectors[precision] = emb
        scores, valid = pair_scores(pairs, chosen_keys, emb[chosen])
        m = verification_metrics(scores, pairs[V.SAME].to_numpy(), pairs[V.FOLD].to_numpy(), valid)
        cosine = (emb * vectors["float32"]).sum(1)
        results[precision] = {
            "accuracy": m["accuracy"]["mean"], "accuracy_std": m["accuracy"]["std"],
            "val_at_far_1e-3": m["val_at_far"]["val"], "auc": m["auc"], "valid_pairs": int(valid.sum()),
            "embed_s": seconds, "faces_per_s": n_faces / seconds,
            "cosine_to_float32": {"min": float(cosine.min()), "p01": float(np.percentile(cosine, 1)),
                                  "mean": float(cosine.mean())}}
        log(f"  {precision}: accuracy {results[precision]['accuracy']:.4f}, {n_faces / seconds:.1f} faces/s")

    print("\n| precision | accuracy | VAL@FAR=1e-3 | AUC | embed faces/s | cosine to float32 (min / p01 / mean) |")
    print("|---|---|---|---|---|---|")
    for precision, r in results.items():
        c = r["cosine_to_float32"]
        print(f"| {precision} | {100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} % "
              f"| {100 * r['val_at_far_1e-3']:.2f} % | {r['auc']:.5f} | {r['faces_per_s']:.1f} "
              f"| {c['min']:.4f} / {c['p01']:.4f} / {c['mean']:.5f} |")
    out = {"command": " ".join(sys.argv), "device": str(device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "pairs": len(pairs), "images": len(keys), "faces": n_faces,
           "valid_pairs_note": "a pair whose image has no face counts as wrong",
           "detect_align_s": det["seconds"], "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
