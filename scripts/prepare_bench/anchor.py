"""The anchor: facenet-pytorch 2.6.0's MTCNN (detection only, its own weights), and how far facemill's boxes
agree with it.

facenet-pytorch's ``detect_face`` imports torchvision for ``batched_nms`` only (plus a transforms import it
does not use for detection). Where torchvision cannot be imported, a stand-in with the same semantics
(greedy NMS per group, IoU without +1, kept indices in descending score order: facemill's own
``batched_nms``, re-ordered by score) is installed into ``sys.modules``; its time is counted in
:data:`STANDIN_NMS`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import time
import types

import numpy as np


class _Clock:
    seconds = 0.0
    calls = 0


STANDIN_NMS = _Clock()   # seconds and calls spent in the stand-in NMS


def _batched_nms_standin(boxes, scores, idxs, iou_threshold):
    """Stand-in for torchvision.ops.boxes.batched_nms: greedy NMS inside each group (idxs value), kept
    indices by descending score."""
    import torch

    from workers.faces.nms import batched_nms

    t0 = time.perf_counter()
    scores = scores.detach().float()
    keep = batched_nms(boxes.detach().float(), scores, idxs.detach(), float(iou_threshold))
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    STANDIN_NMS.seconds += time.perf_counter() - t0
    STANDIN_NMS.calls += 1
    return keep


def _install_torchvision_standin() -> None:
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops_boxes = types.ModuleType("torchvision.ops.boxes")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")

    def _unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stand-in: transforms are not available (detection does not use them)")

    ops_boxes.batched_nms = _batched_nms_standin
    functional.to_tensor = _unavailable
    tv.ops, ops.boxes, tv.transforms, transforms.functional = ops, ops_boxes, transforms, functional
    tv.__facemill_standin__ = True
    for name, mod in (("torchvision", tv), ("torchvision.ops", ops), ("torchvision.ops.boxes", ops_boxes),
                      ("torchvision.transforms", transforms), ("torchvision.transforms.functional", functional)):
        sys.modules[name] = mod


def load_anchor(device):
    """facenet-pytorch's MTCNN (its own weights from facenet_pytorch/data) and how it was imported.

    Returns:
        (detector, info) with info["anchor_nms"] "torchvision" or "stand-in".
    """
    info = {}
    try:
        import torchvision  # noqa: F401

        info["anchor_nms"] = "stand-in" if getattr(torchvision, "__facemill_standin__", False) else "torchvision"
    except Exception as exc:  # noqa: BLE001 - absent or broken (e.g. built for another torch)
        _install_torchvision_standin()
        info["anchor_nms"] = "stand-in"
        info["torchvision_error"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        mtcnn_mod = importlib.import_module("facenet_pytorch.models.mtcnn")
        info["anchor_import"] = "package"
    except ImportError as exc:
        # facenet_pytorch/__init__ also imports InceptionResnetV1 and its downloader (tqdm); detection needs
        # neither, so load the models subpackage under a bare parent package.
        spec = importlib.util.find_spec("facenet_pytorch") if "facenet_pytorch" not in sys.modules else None
        locations = (spec.submodule_search_locations if spec else
                     getattr(sys.modules.get("facenet_pytorch"), "__path__", None))
        if not locations:
            raise SystemExit("error: facenet-pytorch is not installed "
                             "(pip install --no-deps facenet-pytorch==2.6.0)") from exc
        for name in [n for n in sys.modules if n == "facenet_pytorch" or n.startswith("facenet_pytorch.")]:
            del sys.modules[name]
        parent = types.ModuleType("facenet_pytorch")
        parent.__path__ = list(locations)
        sys.modules["facenet_pytorch"] = parent
        mtcnn_mod = importlib.import_module("facenet_pytorch.models.mtcnn")
        info["anchor_import"] = f"models only (package __init__ failed: {type(exc).__name__}: {exc})"[:200]
    from importlib.metadata import PackageNotFoundError, version

    try:
        info["anchor_version"] = version("facenet-pytorch")
    except PackageNotFoundError:
        info["anchor_version"] = None
    detector = mtcnn_mod.MTCNN(keep_all=True, select_largest=False, device=device)
    detector.eval()
    return detector, info


def anchor_boxes(detector, images: list[np.ndarray]) -> list[np.ndarray]:
    """facenet-pytorch detection of a same-size batch: one float32[K, 4] array per image."""
    boxes, _ = detector.detect(np.stack(images))
    return [np.zeros((0, 4), np.float32) if b is None else np.asarray(b, np.float32)[:, :4] for b in boxes]


def agreement(anchor: list[np.ndarray], facemill: list[np.ndarray], iou_min: float = 0.5) -> dict:
    """How far facemill's boxes agree with the anchor's, per image.

    An anchor face is matched when some facemill box of the same image overlaps it with IoU > iou_min;
    box differences are taken against that best-overlapping facemill box.
    """
    import torch

    from workers.faces.nms import box_overlap

    matched, total, diffs, fm_matched = 0, 0, [], 0
    for a, f in zip(anchor, facemill):
        total += len(a)
        if len(a) == 0 or len(f) == 0:
            continue
        a64, f64 = torch.from_numpy(a.astype(np.float64)), torch.from_numpy(f.astype(np.float64))
        iou = box_overlap(a64[None], f64[None])[0].numpy()                 # float64[K, M]
        best = iou.argmax(1)
        ok = iou[np.arange(len(a)), best] > iou_min
        matched += int(ok.sum())
        fm_matched += int((iou.max(0) > iou_min).sum())
        diffs.append(f[best[ok]].astype(np.float64) - a[ok].astype(np.float64))
    d = np.concatenate(diffs) if diffs else np.zeros((0, 4))
    n_fm = sum(len(f) for f in facemill)
    return {
        "anchor_faces": total, "facemill_faces": n_fm, "matched": matched,
        "anchor_matched_fraction": round(matched / total, 4) if total else None,
        "facemill_matched_fraction": round(fm_matched / n_fm, 4) if n_fm else None,
        "mean_abs_box_diff_px": round(float(np.abs(d).mean()), 3) if len(d) else None,
        "mean_signed_box_diff_px": [round(float(v), 3) for v in d.mean(0)] if len(d) else None,
        "iou_threshold": iou_min,
    }
