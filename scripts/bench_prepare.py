"""Benchmark facemill's prepare face stage against facenet-pytorch's MTCNN, on LFW, in one process.

    python scripts/bench_prepare.py --device cpu --images 128 --mosaics 8 --batch 32
    python scripts/bench_prepare.py --device cuda --images 2048 --mosaics 128 --batch 256 --repeat 3 --ray

Workloads (seeded, built in memory):

* ``lfw``: N random LFW images (250 x 250 JPEG files, read once into memory);
* ``mosaic``: 1000 x 1000 mosaics of 16 random LFW images (4 x 4 grid of 250 x 250 tiles), JPEG-encoded
  in memory (quality 95) so that decoding them costs what decoding a real 1 MP file costs.

Per workload and repeat, on the same decoded images and the same batches:

* facemill face stage: ``FaceEngine.process`` (pad/upload, MTCNN, align, SFace embed, copy to host);
* facemill breakdown: the same work cut into timed stages (upload, P-Net pyramid, R-Net, O-Net, align,
  embed, to-host, write = JPEG-encode crops + Parquet commit through ``workers.actors.write_shard``),
  synchronising CUDA around each stage;
* anchor: facenet-pytorch 2.6.0 ``MTCNN.detect`` (detection only) with its own weights.

``--ray`` also runs the whole prepare pipeline (``workers.pipeline.run_prepare``) on an embedded local Ray,
writing Parquet to a temporary folder. Prints a table and writes JSON (``--json``).

facenet-pytorch's ``detect_face`` imports torchvision for ``batched_nms`` only (plus a transforms import it
does not use for detection). Where torchvision cannot be imported, a stand-in with the same semantics
(greedy NMS per group, IoU without +1, kept indices in descending score order) is installed into
``sys.modules``; ``anchor_nms`` in the JSON says which one ran, and the stand-in's own time is reported.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench_prepare.py` from anywhere
    sys.path.insert(0, str(REPO))

DEFAULT_LFW = REPO.parent / "shared" / "data" / "lfw" / "images"
MOSAIC_GRID = 4
TILE = 250
STATS = {"median": statistics.median, "min": min}  # --stat: how repeats are summarised
STAGES = ("upload", "pnet", "rnet", "onet", "align", "embed", "to_host", "write")


# --------------------------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass
class Workload:
    """Encoded images of one workload.

    Attributes:
        name: "lfw" or "mosaic".
        uris: one name per image (LFW: the file path; mosaic: a synthetic name).
        blobs: the encoded (JPEG) bytes of each image.
        sources: per image, the LFW files it was made of (one for lfw, 16 for a mosaic).
    """

    name: str
    uris: list[str]
    blobs: list[bytes]
    sources: list[list[str]]


def _lfw_files(root: Path) -> list[Path]:
    files = sorted(root.rglob("*.jpg"))
    if not files:
        raise SystemExit(f"error: no LFW .jpg files under {str(root)!r} (use --lfw PATH)")
    return files


def lfw_workload(files: list[Path], n: int, seed: int) -> Workload:
    """N random LFW files, read into memory."""
    if n > len(files):
        raise SystemExit(f"error: --images {n} but only {len(files)} LFW files")
    chosen = random.Random(seed).sample(files, n)
    return Workload("lfw", [str(p) for p in chosen], [p.read_bytes() for p in chosen],
                    [[str(p)] for p in chosen])


def mosaic_workload(files: list[Path], n: int, seed: int, quality: int = 95) -> Workload:
    """N 1000 x 1000 mosaics, each a 4 x 4 grid of 250 x 250 LFW images, JPEG-encoded in memory."""
    import cv2

    rng = random.Random(seed + 1)
    side = MOSAIC_GRID * TILE
    uris, blobs, sources = [], [], []
    for m in range(n):
        tiles = rng.sample(files, MOSAIC_GRID * MOSAIC_GRID)
        canvas = np.zeros((side, side, 3), np.uint8)
        for k, path in enumerate(tiles):
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise SystemExit(f"error: cannot decode LFW file {str(path)!r}")
            if bgr.shape[:2] != (TILE, TILE):
                bgr = cv2.resize(bgr, (TILE, TILE), interpolation=cv2.INTER_AREA)
            r, c = divmod(k, MOSAIC_GRID)
            canvas[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = bgr
        ok, enc = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise SystemExit("error: cv2.imencode failed on a mosaic")
        uris.append(f"mosaic-{seed}-{m:05d}.jpg")
        blobs.append(enc.tobytes())
        sources.append([str(p) for p in tiles])
    return Workload("mosaic", uris, blobs, sources)


def same_shape_batches(images: list[np.ndarray], batch: int) -> list[list[int]]:
    """Indices of the images cut into batches of at most ``batch`` images of one shape (the anchor needs it)."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    return [idx[s:s + batch] for idx in groups.values() for s in range(0, len(idx), batch)]


# --------------------------------------------------------------------------------------------------------
# Measuring: time, host memory, GPU memory and utilisation


def _vm_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (getrusage; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class GpuSampler:
    """Samples ``nvidia-smi`` utilisation and memory in a background thread (a no-op without nvidia-smi)."""

    def __init__(self, gpu_index: str, interval_ms: int = 200):
        self.gpu_index, self.interval_ms = gpu_index, interval_ms
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, util %, memory used MiB)
        self._proc = None
        self._thread = None

    def start(self) -> "GpuSampler":
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        try:
            self._proc = subprocess.Popen(
                [exe, f"--id={self.gpu_index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._proc = None
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.perf_counter(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue

    @property
    def active(self) -> bool:
        return self._proc is not None

    def summary(self, windows: list[tuple[float, float]]) -> dict | None:
        """Mean and max utilisation (%) and max memory used (MiB) over the samples inside the windows."""
        if not self.active:
            return None
        inside = [s for s in list(self.samples) if any(t0 <= s[0] <= t1 for t0, t1 in windows)]
        if not inside:
            return {"samples": 0}
        util = [s[1] for s in inside]
        return {"samples": len(inside), "util_mean": round(statistics.fmean(util), 1),
                "util_max": max(util), "mem_used_max_mib": max(s[2] for s in inside)}

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)


class Phases:
    """Wall-clock windows, peak host RSS and peak GPU memory of named phases (a phase may recur)."""

    def __init__(self, torch_mod, device, sampler: GpuSampler):
        self.torch, self.device, self.sampler = torch_mod, device, sampler
        self.windows: dict[str, list[tuple[float, float]]] = {}
        self.rss_mib: dict[str, float] = {}
        self.gpu_mib: dict[str, float] = {}
        self.cpu_s: dict[str, list[float]] = {}
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        per_phase_rss = _reset_vm_hwm()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            t1 = time.perf_counter()
            self.windows.setdefault(name, []).append((t0, t1))
            self.cpu_s.setdefault(name, []).append(time.process_time() - c0)
            hwm = _vm_hwm_kib() if per_phase_rss else None
            rss = hwm / 1024 if hwm is not None else peak_rss_mib()
            self.rss_mib[name] = max(self.rss_mib.get(name, 0.0), rss)
            if self.cuda:
                peak = self.torch.cuda.max_memory_allocated(self.device) / 2**20
                self.gpu_mib[name] = max(self.gpu_mib.get(name, 0.0), peak)

    def report(self, name: str, stat=statistics.median) -> dict:
        """Peaks, GPU samples and process CPU seconds (``stat`` over the occurrences) of a phase."""
        return {"cpu_s": round(stat(self.cpu_s[name]), 3) if name in self.cpu_s else None,
                "peak_rss_mib": round(self.rss_mib.get(name, float("nan")), 1),
                "peak_gpu_mib": round(self.gpu_mib[name], 1) if name in self.gpu_mib else None,
                "gpu": self.sampler.summary(self.windows.get(name, []))}


class StageClock:
    """Accumulated seconds per stage, and per part inside a stage; synchronises CUDA around each."""

    def __init__(self, sync):
        self.sync, self.seconds = sync, dict.fromkeys(STAGES, 0.0)
        self.cpu_seconds = dict.fromkeys(STAGES, 0.0)
        self.parts: dict[str, float] = {}
        self.stage: str | None = None

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.stage = stage
        try:
            yield
        finally:
            self.sync()
            self.stage = None
            self.seconds[stage] += time.perf_counter() - t0
            self.cpu_seconds[stage] += time.process_time() - c0

    @contextlib.contextmanager
    def part(self, name: str):
        """Time a part of the current stage as "<stage>.<name>" (nested parts are not subtracted)."""
        key = f"{self.stage}.{name}"
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.parts[key] = self.parts.get(key, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def instrument_mtcnn(detector, clock: StageClock):
    """Time MTCNN's resizes, nets, crops and NMS calls without touching library code.

    Swaps the module-level helpers that ``workers.faces.mtcnn`` calls (``resize_area``, ``sample_patches``,
    ``batched_nms``) for timed wrappers, and hooks the three nets; everything is restored on exit.
    """
    import workers.faces.mtcnn as mtcnn_mod

    def timed(fn, part):
        def wrapper(*args, **kwargs):
            with clock.part(part):
                return fn(*args, **kwargs)
        return wrapper

    originals = {name: getattr(mtcnn_mod, name) for name in ("resize_area", "sample_patches", "batched_nms")}
    parts = {"resize_area": "resize", "sample_patches": "crops", "batched_nms": "nms"}
    started: list[float] = []

    def pre(module, inputs):
        clock.sync()
        started.append(time.perf_counter())

    def post(module, inputs, output):
        clock.sync()
        key = f"{clock.stage}.net"
        clock.parts[key] = clock.parts.get(key, 0.0) + time.perf_counter() - started.pop()

    handles = []
    try:
        for name, fn in originals.items():
            setattr(mtcnn_mod, name, timed(fn, parts[name]))
        for net in (detector.pnet, detector.rnet, detector.onet):
            handles += [net.register_forward_pre_hook(pre), net.register_forward_hook(post)]
        yield
    finally:
        for name, fn in originals.items():
            setattr(mtcnn_mod, name, fn)
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------------
# The anchor: facenet-pytorch MTCNN


class _NmsTimer:
    seconds = 0.0
    calls = 0


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision.ops.nms semantics on float32[N, 4] x1 y1 x2 y2: indices kept, by descending score."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (area[i] + area[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, np.int64)


def _batched_nms_standin(boxes, scores, idxs, iou_threshold):
    """Stand-in for torchvision.ops.boxes.batched_nms: greedy NMS inside each group (idxs value)."""
    import torch

    t0 = time.perf_counter()
    b = boxes.detach().float().cpu().numpy()
    s = scores.detach().float().cpu().numpy()
    g = idxs.detach().cpu().numpy()
    kept = [np.nonzero(g == grp)[0] for grp in np.unique(g)]
    kept = [ids[_greedy_nms(b[ids], s[ids], float(iou_threshold))] for ids in kept]
    keep = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    keep = keep[np.argsort(-s[keep], kind="stable")]
    _NmsTimer.seconds += time.perf_counter() - t0
    _NmsTimer.calls += 1
    return torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)


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


# --------------------------------------------------------------------------------------------------------
# facemill


def load_facemill(device, embed_precision: str = "float32"):
    from workers.faces.embedders import load_embedder
    from workers.faces.engine import EngineConfig, FaceEngine
    from workers.faces.mtcnn import MTCNN

    config = EngineConfig(embed_precision=embed_precision)
    embedder = load_embedder("sface", device)
    engine = FaceEngine(MTCNN.pretrained(config.mtcnn, device), embedder.module, config)
    return engine, embedder.spec


def write_batch(output: str, shard: str, uris: list[str], images: list[np.ndarray], res, spec) -> None:
    """Write one batch as a shard exactly as the pipeline's write task does (crops JPEG-encoded, one Delta
    commit)."""
    from workers import dataset, records
    from workers.actors import shard_row, write_shard

    dataset.create_dataset(output, spec.embedding_dim)  # idempotent: a marker read once the table exists
    n = len(uris)
    images_t = records.images_table(
        shard=shard, uris=uris, identities=[None] * n, fingerprints=[None] * n,
        widths=np.array([im.shape[1] for im in images]), heights=np.array([im.shape[0] for im in images]),
        errors=[None] * n, details=[None] * n, num_faces=res.num_faces, settings="bench", run_id="bench")
    faces_t = records.faces_table(
        shard=shard, uris=uris, identities=[None] * n, image_index=res.image_index, boxes=res.boxes,
        scores=res.scores, landmarks=res.landmarks, crops=None, embeddings=res.embeddings,
        embedder=spec.name, embedder_version=spec.version, run_id="bench")
    write_shard(shard_row(shard, images_t, faces_t, res.crops), output=output, storage_options=None, crop_quality=95)


def breakdown_batch(engine, images: list[np.ndarray], clock: StageClock, write) -> object:
    """``FaceEngine.process`` cut into timed stages (same calls, same order), then the write.

    Returns:
        The batch's FaceResults.
    """
    import torch

    from workers.faces.align import align_faces
    from workers.faces.embedders import embed_crops
    from workers.faces.engine import FaceResults
    from workers.faces.resample import pad_images, patch_canvas

    det = engine.detector
    with torch.inference_mode():
        with clock("upload"):
            batch, sizes = pad_images(images, engine.device)
            batch = batch.float().contiguous()
        with clock("pnet"):
            cand = det.stage1(batch, sizes)
        with clock("rnet"):  # the crop canvas (shared by R-Net, O-Net and align) is counted here
            canvas = patch_canvas(batch, sizes)
            cand = det.stage2(batch, sizes, *cand, canvas=canvas)
        with clock("onet"):
            found = det.stage3(batch, sizes, *cand, canvas=canvas)
            detections = det.select(*found, sizes, batch.shape[0])
        with clock("align"):
            image_index, boxes, scores, landmarks = detections.flat()
            crops, _ = align_faces(batch, sizes, image_index, landmarks, engine.config.align, canvas)
        with clock("embed"):
            emb = embed_crops(engine.embedder, crops, engine.config.embed_batch_size,
                              engine.config.embed_precision)
        with clock("to_host"):
            res = FaceResults(
                num_faces=detections.num_faces.int().cpu().numpy(), image_index=image_index.cpu().numpy(),
                boxes=boxes.float().cpu().numpy(), scores=scores.float().cpu().numpy(),
                landmarks=landmarks.float().cpu().numpy(), crops=crops.cpu().numpy(),
                embeddings=emb.cpu().numpy())
    with clock("write"):
        write(res)
    return res


# --------------------------------------------------------------------------------------------------------
# Agreement


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU float64[K, M] of float[K, 4] and float[M, 4] x1 y1 x2 y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def agreement(anchor: list[np.ndarray], facemill: list[np.ndarray], iou_min: float = 0.5) -> dict:
    """How far facemill's boxes agree with the anchor's, per image.

    An anchor face is matched when some facemill box of the same image overlaps it with IoU > iou_min;
    box differences are taken against that best-overlapping facemill box.
    """
    matched, total, diffs, fm_matched = 0, 0, [], 0
    for a, f in zip(anchor, facemill):
        total += len(a)
        if len(a) == 0 or len(f) == 0:
            continue
        iou = box_iou(a.astype(np.float64), f.astype(np.float64))
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


# --------------------------------------------------------------------------------------------------------
# The optional Ray pipeline run


def _ray_inputs(work: Workload, tmp: Path) -> str:
    """A folder of the workload's files (``<identity>/<file>`` for lfw) that run_prepare can list.

    The files are written from memory rather than listed in a manifest: a manifest carries no fingerprints,
    and ``plan_shards`` cannot key such shards under pandas 3 (``astype(str)`` keeps None as NaN).
    """
    folder = tmp / f"{work.name}_inputs"
    for uri, blob in zip(work.uris, work.blobs):
        rel = Path(Path(uri).parent.name, Path(uri).name) if work.name == "lfw" else Path(uri)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(blob)
    return str(folder)


def run_ray(work: Workload, device: str, args, tmp: Path, log) -> dict:
    import schemas as S
    from workers import dataset
    from workers.faces.engine import EngineConfig
    from workers.graph import PoolSettings
    from workers.pipeline import PrepareConfig, run_prepare

    inputs = _ray_inputs(work, tmp)
    output = tmp / f"ray_out_{work.name}"
    pool = PoolSettings(shards_per_call=args.ray_shards_per_call, actors=args.ray_actors,
                        device="cuda" if device == "cuda" else "cpu", cpus_per_actor=args.ray_cpus_per_actor)
    cfg = PrepareConfig(input=inputs, output=str(output), shard_size=args.ray_shard_size, pool=pool,
                        run_id=f"bench-{work.name}",
                        engine=EngineConfig(embed_precision=args.embed_precision))
    t0 = time.perf_counter()
    summary = run_prepare(cfg, log=lambda msg: log(f"    {msg}"))
    wall = time.perf_counter() - t0
    rows = dataset.read_table(str(output), S.FACES, columns=[S.SHARD]).num_rows
    return {"wall_s": round(wall, 3), "images": summary["images_in"], "faces": summary["faces"],
            "faces_rows_written": rows, "pipeline_wall_time_s": summary["wall_time_s"],
            "shard_size": cfg.shard_size, "actors": pool.actors, "cpus_per_actor": pool.cpus_per_actor}


def start_ray(num_gpus: int):
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    pythonpath = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=num_gpus, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    with contextlib.suppress(Exception):
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    return ray


# --------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python scripts/bench_prepare.py", description=__doc__.splitlines()[0])
    p.add_argument("--lfw", type=Path, default=DEFAULT_LFW, help="LFW images folder (<identity>/<file>.jpg)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--images", type=int, default=256, help="random LFW images (lfw workload)")
    p.add_argument("--mosaics", type=int, default=16, help="1000x1000 mosaics of 16 LFW faces (mosaic workload)")
    p.add_argument("--batch", type=int, default=32, help="images per batch (both systems)")
    p.add_argument("--mosaic-batch", type=int, default=0, help="images per mosaic batch (0: --batch)")
    p.add_argument("--workloads", default="lfw,mosaic", help="comma-separated: lfw, mosaic")
    p.add_argument("--repeat", type=int, default=1, help="timed passes per system")
    p.add_argument("--stat", choices=tuple(STATS), default="median",
                   help="statistic over the repeats (min: best of N, for machines shared with other jobs)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed warm-up passes over all batches (0: the first batch only)")
    p.add_argument("--no-parts", action="store_true",
                   help="do not time MTCNN's resizes / nets / crops / NMS inside the breakdown (fewer syncs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-precision", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="facemill's embedder precision (EngineConfig.embed_precision)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--ray", action="store_true", help="also run the Ray prepare pipeline (a Delta dataset in a tmp dir)")
    p.add_argument("--ray-shard-size", type=int, default=32)
    p.add_argument("--ray-shards-per-call", type=int, default=1)
    p.add_argument("--ray-actors", type=int, default=0, help="face actors (0: one per GPU, or 1 on CPU)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=Path("bench.json"), help="where to write the results")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in ("lfw", "mosaic")]
    if bad:
        p.error(f"--workloads must name lfw and/or mosaic, got {bad}")
    for name in ("images", "mosaics", "batch", "repeat"):
        if getattr(args, name) < (0 if name in ("images", "mosaics") else 1):
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 2) if seconds > 0 else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from workers.decode import decode_image
    from workers.faces.embedders import default_embed_batch
    from workers.faces.mtcnn import default_crop_chunk, default_stage1_pixels

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_name = args.device
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    gpu_index = visible if visible.isdigit() else str(device.index or 0)
    sampler = GpuSampler(gpu_index).start() if device.type == "cuda" else GpuSampler(gpu_index)
    phases = Phases(torch, device, sampler)

    machine = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda, "nvidia_smi": sampler.active,
    }
    log(f"bench_prepare: device {device}, torch {torch.__version__} ({machine['torch_threads']} threads), "
        f"{os.cpu_count()} CPUs" + (f", {machine['gpu']}" if machine["gpu"] else ""))

    t_load = time.perf_counter()
    engine, spec = load_facemill(device, args.embed_precision)
    anchor, anchor_info = load_anchor(device)
    log(f"models loaded in {time.perf_counter() - t_load:.1f} s; anchor: facenet-pytorch "
        f"{anchor_info.get('anchor_version')}, NMS {anchor_info['anchor_nms']}")

    files = _lfw_files(args.lfw)
    builders = {"lfw": lambda: lfw_workload(files, args.images, args.seed),
                "mosaic": lambda: mosaic_workload(files, args.mosaics, args.seed)}
    results = {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else argv,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": machine, **anchor_info,
               "facemill_config": json.loads(json.dumps(dataclasses.asdict(engine.config), default=str)),
               "facemill_chunks": {"crop_chunk": engine.config.mtcnn.crop_chunk or default_crop_chunk(device),
                                   "stage1_pixels": engine.config.mtcnn.stage1_pixels
                                   or default_stage1_pixels(device),
                                   "embed_batch_size": engine.config.embed_batch_size or default_embed_batch(device)},
               "workloads": {}}
    tmp_root = Path(tempfile.mkdtemp(prefix="facemill-bench-"))
    ray = None
    try:
        for name in args.workloads:
            work = builders[name]()
            if not work.blobs:
                continue
            batch_size = args.mosaic_batch if name == "mosaic" and args.mosaic_batch else args.batch
            log(f"[{name}] {len(work.blobs)} images, batches of {batch_size}, {args.repeat} repeat(s)")
            results["workloads"][name] = res = run_workload(
                work, batch_size, args, engine, spec, anchor, phases, tmp_root, log, decode_image)
            if args.ray:
                if ray is None:
                    ray = start_ray(1 if device.type == "cuda" else 0)
                log(f"[{name}] Ray prepare pipeline")
                with phases.phase(f"{name}/ray"):
                    res["ray"] = run_ray(work, device.type, args, tmp_root, log)
                report = phases.report(f"{name}/ray")
                report["driver_cpu_s"] = report.pop("cpu_s")  # the Ray workers' CPU is not counted
                res["ray"].update(report)
                res["ray"]["img_per_s"] = _rate(res["ray"]["images"], res["ray"]["wall_s"])
                res["ray"]["faces_per_s"] = _rate(res["ray"]["faces"], res["ray"]["wall_s"])
    finally:
        sampler.stop()
        if ray is not None:
            ray.shutdown()
        shutil.rmtree(tmp_root, ignore_errors=True)
    results["peak_rss_mib_process"] = round(peak_rss_mib(), 1)
    results["anchor_nms_standin_s"] = round(_NmsTimer.seconds, 3)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.json}")
    return results


def run_workload(work: Workload, batch_size: int, args, engine, spec, anchor, phases: Phases, tmp_root: Path,
                 log, decode_image) -> dict:
    name = work.name
    # Decode (shared by both systems: they get the same decoded pixels).
    decode_s, images, uris, errors = [], None, None, 0
    for _ in range(args.repeat):
        with phases.phase(f"{name}/decode"):
            t0 = time.perf_counter()
            decoded = [decode_image(b) for b in work.blobs]
            decode_s.append(time.perf_counter() - t0)
    images = [d.image for d in decoded if d.image is not None]
    uris = [u for u, d in zip(work.uris, decoded) if d.image is not None]
    errors = len(decoded) - len(images)
    batches = same_shape_batches(images, batch_size)
    n = len(images)

    # Warm-up, not timed: lazy kernels, allocator, first imports of the write path.
    warm = batches if args.warmup else batches[:1]
    for _ in range(max(1, args.warmup)):
        for idx in warm:
            ims = [images[i] for i in idx]
            out = engine.process(ims)
            anchor_boxes(anchor, ims)
    write_batch(str(tmp_root / f"warmup_{name}"), "warmup", [uris[i] for i in warm[-1]],
                [images[i] for i in warm[-1]], out, spec)
    shutil.rmtree(tmp_root / f"warmup_{name}", ignore_errors=True)
    phases.sync()

    times = {"facemill": [], "breakdown": [], "anchor": []}
    stage_runs: list[dict] = []
    part_runs: list[dict] = []
    stage_cpu_runs: list[dict] = []
    faces = {}
    nms_runs: list[float] = []
    for r in range(args.repeat):
        with phases.phase(f"{name}/facemill"):
            t0 = time.perf_counter()
            fm_counts = []
            for idx in batches:
                out = engine.process([images[i] for i in idx])
                fm_counts.append(out.num_faces)
            phases.sync()
            times["facemill"].append(time.perf_counter() - t0)
        faces["facemill"] = int(sum(c.sum() for c in fm_counts))

        clock = StageClock(phases.sync)
        out_dir = tmp_root / f"write_{name}_{r}"
        fm_boxes: list[np.ndarray] = [np.zeros((0, 4), np.float32)] * n
        bd_counts = []
        parts_cm = contextlib.nullcontext() if args.no_parts else instrument_mtcnn(engine.detector, clock)
        with phases.phase(f"{name}/breakdown"), parts_cm:
            t0 = time.perf_counter()
            for k, idx in enumerate(batches):
                ims = [images[i] for i in idx]
                write = (lambda res, ims=ims, idx=idx, k=k: write_batch(
                    str(out_dir), f"bench-{k:05d}", [uris[i] for i in idx], ims, res, spec))
                out = breakdown_batch(engine, ims, clock, write)
                bd_counts.append(out.num_faces)
                for j, i in enumerate(idx):
                    fm_boxes[i] = out.boxes[out.image_index == j]
            times["breakdown"].append(time.perf_counter() - t0)
        stage_runs.append(clock.seconds)
        stage_cpu_runs.append(clock.cpu_seconds)
        part_runs.append(clock.parts)
        shutil.rmtree(out_dir, ignore_errors=True)
        same = all(np.array_equal(a, b) for a, b in zip(fm_counts, bd_counts))

        with phases.phase(f"{name}/anchor"):
            t0 = time.perf_counter()
            an_boxes: list[np.ndarray] = [np.zeros((0, 4), np.float32)] * n
            nms0 = _NmsTimer.seconds
            for idx in batches:
                for i, b in zip(idx, anchor_boxes(anchor, [images[i] for i in idx])):
                    an_boxes[i] = b
            times["anchor"].append(time.perf_counter() - t0)
            nms_runs.append(_NmsTimer.seconds - nms0)
        faces["anchor"] = int(sum(len(b) for b in an_boxes))
        log(f"  repeat {r + 1}: facemill {times['facemill'][-1]:.2f} s, breakdown {times['breakdown'][-1]:.2f} s, "
            f"anchor {times['anchor'][-1]:.2f} s")

    stat = STATS[args.stat]
    stages = {s: round(stat([run[s] for run in stage_runs]), 4) for s in STAGES}
    stages_cpu = {s: round(stat([run[s] for run in stage_cpu_runs]), 4) for s in STAGES}
    part_keys = sorted({k for run in part_runs for k in run}, key=lambda k: (STAGES.index(k.split(".")[0]), k))
    parts = {k: round(stat([run.get(k, 0.0) for run in part_runs]), 4) for k in part_keys}
    for stage in () if args.no_parts else ("pnet", "rnet", "onet"):  # what the timed parts leave: indexing, nonzero, box math, syncs
        inner = sum(v for k, v in parts.items() if k.startswith(f"{stage}."))
        parts[f"{stage}.other"] = round(stages[stage] - inner, 4)
    detect_s = sum(stages[s] for s in ("upload", "pnet", "rnet", "onet"))
    dec = stat(decode_s)
    fm, an = stat(times["facemill"]), stat(times["anchor"])
    nms_s = stat(nms_runs)
    systems = {
        "decode": {"seconds": round(dec, 4), "images": n, "faces": None, **phases.report(f"{name}/decode", stat)},
        "facemill": {"seconds": round(fm, 4), "images": n, "faces": faces["facemill"],
                     **phases.report(f"{name}/facemill", stat)},
        "facemill_detect": {"seconds": round(detect_s, 4), "images": n, "faces": faces["facemill"],
                            "note": "upload + P/R/O-Net stages of the breakdown pass",
                            **phases.report(f"{name}/breakdown", stat),
                            "cpu_s": round(sum(stages_cpu[s] for s in ("upload", "pnet", "rnet", "onet")), 4)},
        "anchor": {"seconds": round(an, 4), "images": n, "faces": faces["anchor"],
                   "of_which_standin_nms_s": round(nms_s, 4), **phases.report(f"{name}/anchor", stat)},
    }
    for s in systems.values():
        s["img_per_s"] = _rate(n, s["seconds"])
        s["img_per_s_with_decode"] = _rate(n, s["seconds"] + dec) if s is not systems["decode"] else None
        s["faces_per_s"] = _rate(s["faces"], s["seconds"]) if s["faces"] is not None else None
    an_cpu = systems["anchor"]["cpu_s"]
    for key in ("facemill", "facemill_detect"):
        systems[key]["ratio_vs_anchor"] = round(an / systems[key]["seconds"], 3) if systems[key]["seconds"] else None
        cpu = systems[key]["cpu_s"]
        systems[key]["ratio_vs_anchor_cpu"] = round(an_cpu / cpu, 3) if cpu else None
        systems[key]["ratio_vs_anchor_with_decode"] = round((an + dec) / (systems[key]["seconds"] + dec), 3)
    return {
        "images": n, "decode_errors": errors, "batch": batch_size, "batches": len(batches),
        "image_shape": list(images[0].shape) if images else None,
        "times_s": {k: [round(t, 4) for t in v]
                    for k, v in {**times, "decode": decode_s, "anchor_standin_nms": nms_runs}.items()},
        "systems": systems,
        "breakdown_s": stages,
        "breakdown_share": {s: round(v / max(sum(stages.values()), 1e-12), 4) for s, v in stages.items()},
        "breakdown_parts_s": parts,
        "breakdown_cpu_s": stages_cpu,
        "breakdown_matches_process": same,
        "agreement": agreement(an_boxes, fm_boxes),
    }


def _fmt(v, spec="{:.1f}") -> str:
    return "-" if v is None else spec.format(v)


def print_table(results: dict) -> None:
    """The summary table (Markdown) and the stage breakdown."""
    head = ("| workload | run | images | faces | s | CPU s | img/s | img/s incl. decode | faces/s | x anchor | x anchor (CPU s) "
            "| peak RSS MiB | peak GPU MiB | GPU util % |")
    args = results["args"]
    print(f"\n{args['stat']} of {args['repeat']} repeat(s); 'x anchor' = anchor seconds / facemill seconds")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, w in results["workloads"].items():
        rows = [("decode (cv2, shared)", w["systems"]["decode"]), ("facemill face stage", w["systems"]["facemill"]),
                ("facemill detect only", w["systems"]["facemill_detect"]),
                ("facenet-pytorch detect", w["systems"]["anchor"])]
        if "ray" in w:
            rows.append(("facemill Ray prepare", {**w["ray"], "seconds": w["ray"]["wall_s"],
                                                  "ratio_vs_anchor": None}))
        an_rate = w["systems"]["anchor"]["img_per_s"]
        for label, s in rows:
            ratio = s.get("ratio_vs_anchor")
            if label == "facemill Ray prepare" and an_rate:
                ratio = s["img_per_s"] / an_rate
            gpu = s.get("gpu") or {}
            print(f"| {name} | {label} | {s['images']} | {_fmt(s.get('faces'), '{}')} | {s['seconds']:.2f} "
                  f"| {_fmt(s.get('cpu_s'), '{:.2f}')} | {_fmt(s['img_per_s'])} | {_fmt(s.get('img_per_s_with_decode'))} "
                  f"| {_fmt(s.get('faces_per_s'))} | {_fmt(ratio, '{:.2f}')} "
                  f"| {_fmt(s.get('ratio_vs_anchor_cpu'), '{:.2f}')} "
                  f"| {_fmt(s.get('peak_rss_mib'), '{:.0f}')} | {_fmt(s.get('peak_gpu_mib'), '{:.0f}')} "
                  f"| {_fmt(gpu.get('util_mean'))} |")
    print()
    print("| workload | " + " | ".join(STAGES) + " | total |")
    print("|" + "---|" * (len(STAGES) + 2))
    for name, w in results["workloads"].items():
        b = w["breakdown_s"]
        total = sum(b.values())
        cells = [f"{b[s]:.2f} s ({100 * b[s] / total:.0f}%)" if total else "-" for s in STAGES]
        print(f"| {name} | " + " | ".join(cells) + f" | {total:.2f} s |")
        c = w["breakdown_cpu_s"]
        print(f"| {name} (CPU s) | " + " | ".join(f"{c[s]:.2f}" for s in STAGES) + f" | {sum(c.values()):.2f} |")
    print()
    for name, w in results["workloads"].items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in w["breakdown_parts_s"].items())
        print(f"{name} detector parts (s): {parts}")
    print()
    for name, w in results["workloads"].items():
        a = w["agreement"]
        print(f"{name}: anchor faces {a['anchor_faces']}, facemill faces {a['facemill_faces']}, anchor faces "
              f"matched (IoU > {a['iou_threshold']}) {_fmt(a['anchor_matched_fraction'], '{:.3f}')}, facemill "
              f"faces matched {_fmt(a['facemill_matched_fraction'], '{:.3f}')}, mean |box diff| "
              f"{_fmt(a['mean_abs_box_diff_px'], '{:.2f}')} px (signed x1 y1 x2 y2: "
              f"{a['mean_signed_box_diff_px']}); breakdown == process: {w['breakdown_matches_process']}")
    print(f"anchor NMS: {results['anchor_nms']} ({results['anchor_nms_standin_s']:.2f} s in the stand-in); "
          f"peak RSS of the process {results['peak_rss_mib_process']:.0f} MiB")


if __name__ == "__main__":
    main()
