"""Known faults injected into an LFW-style image folder: the ground truth of ``scripts/bench_audit.py``.

    python scripts/audit_faults.py --images ../shared/data/lfw/images --output /tmp/audit_bench/faults --seed 0

Writes ``<output>/manifest.csv`` (uri, identity) over every image of the folder plus the copies, the copies
under ``<output>/copies/``, and ``<output>/truth.json``:

* **relabelled**: ``relabel_rate`` of the images of identities with at least ``min_images`` images get
  another identity in the manifest (drawn uniformly from the other identities);
* **near-copies**: ``copy_rate`` of all the (not relabelled) images are copied once, each copy degraded
  by one of :data:`TRANSFORMS` in turn (``all``: every one of them, in that order) and listed under the
  same identity or, for every other copy, under another one (a label conflict: that copy is also a
  mislabelled face).

No facemill code is used: the faults are made the way a user's data would have them.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

TRANSFORMS = ("jpeg40", "resize0.6", "crop10", "hflip", "all")


def degrade(image: np.ndarray, transform: str) -> bytes:
    """JPEG bytes of ``image`` (uint8[H, W, 3] BGR) after ``transform`` (one of :data:`TRANSFORMS`)."""
    steps = ("resize0.6", "crop10", "hflip", "jpeg40") if transform == "all" else (transform,)
    quality = 95
    for step in steps:
        if step == "resize0.6":
            image = cv2.resize(image, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
        elif step == "crop10":           # 10 % of each side off, the face stays in the middle
            h, w = image.shape[:2]
            dy, dx = int(round(0.05 * h)), int(round(0.05 * w))
            image = image[dy:h - dy, dx:w - dx]
        elif step == "hflip":
            image = image[:, ::-1]
        elif step == "jpeg40":
            quality = 40
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def list_images(images: str) -> pd.DataFrame:
    """uri (absolute path), identity (folder name) of every ``.jpg`` of ``<images>/<identity>/``, sorted."""
    root = Path(images).resolve()
    paths = sorted(root.glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"error: no <identity>/<image>.jpg under {images!r}")
    return pd.DataFrame({"uri": [str(p) for p in paths], "identity": [p.parent.name for p in paths]})


def inject(images: str, output: str, seed: int = 0, relabel_rate: float = 0.02, copy_rate: float = 0.01,
           min_images: int = 4) -> dict:
    """Write the manifest, the copies and the truth of one injected set; returns the truth."""
    rng = np.random.default_rng(seed)
    df = list_images(images)
    counts = df["identity"].map(df["identity"].value_counts())
    names = np.array(sorted(df["identity"].unique()))
    eligible = np.flatnonzero(counts.to_numpy() >= min_images)
    moved = np.sort(rng.choice(eligible, size=int(round(relabel_rate * len(eligible))), replace=False))
    given = df["identity"].to_numpy().copy()
    for i in moved:                       # a few hundred draws at most: not a hot path
        others = names[names != given[i]]
        given[i] = others[rng.integers(len(others))]
    rest = np.setdiff1d(np.arange(len(df)), moved)
    copied = np.sort(rng.choice(rest, size=int(round(copy_rate * len(df))), replace=False))
    out = Path(output)
    (out / "copies").mkdir(parents=True, exist_ok=True)
    rows, pairs = [], []
    for k, i in enumerate(copied):
        transform = TRANSFORMS[k % len(TRANSFORMS)]
        same = k % 2 == 0
        identity = df["identity"][i]
        if not same:
            others = names[names != identity]
            identity = others[rng.integers(len(others))]
        image = cv2.imread(df["uri"][i], cv2.IMREAD_COLOR)
        path = out / "copies" / f"copy{k:05d}_{transform}.jpg"
        path.write_bytes(degrade(image, transform))
        rows.append({"uri": str(path), "identity": identity})
        pairs.append({"copy": str(path), "original": df["uri"][i], "transform": transform,
                      "same_identity": same, "copy_identity": identity, "original_identity": df["identity"][i]})
    manifest = pd.concat([pd.DataFrame({"uri": df["uri"], "identity": given}), pd.DataFrame(rows)],
                         ignore_index=True)
    manifest.to_csv(out / "manifest.csv", index=False)
    truth = {
        "seed": seed, "images": int(len(df)), "manifest_rows": int(len(manifest)),
        "relabelled": [{"uri": df["uri"][i], "true_identity": df["identity"][i], "given_identity": given[i]}
                       for i in moved],
        "copies": pairs,
        "settings": {"relabel_rate": relabel_rate, "copy_rate": copy_rate, "min_images": min_images,
                     "transforms": list(TRANSFORMS)},
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=os.path.join("..", "shared", "data", "lfw", "images"))
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relabel-rate", type=float, default=0.02)
    p.add_argument("--copy-rate", type=float, default=0.01)
    args = p.parse_args(argv)
    truth = inject(args.images, args.output, args.seed, args.relabel_rate, args.copy_rate)
    print(f"{truth['manifest_rows']} manifest rows: {len(truth['relabelled'])} relabelled, "
          f"{len(truth['copies'])} near-copies -> {args.output}")


if __name__ == "__main__":
    main()
