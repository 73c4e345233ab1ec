"""What the prepare report reads: rates and counts from the shard summary rows, the run's record (its
alignment), and a few sample faces from the dataset. Bounded: at most :data:`MAX_SAMPLE_SHARDS` shards are
read for samples; nothing scans the whole dataset."""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

import schemas as S

log = logging.getLogger(__name__)

NUM_SAMPLES = 16
MAX_SAMPLE_SHARDS = 4
SAMPLE_COLUMNS = (S.URI, S.IDENTITY, S.SCORE, S.LANDMARKS, S.CROP, S.RUN_ID)


def reason_counts(rows: Sequence[Mapping]) -> Counter:
    """Failed images by error reason over the shard rows (``reasons``: a JSON object per row)."""
    reasons = Counter()
    for r in rows:
        raw = r.get("reasons") or "{}"
        reasons.update(json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw))
    return reasons


def concat_rows(rows: Sequence[Mapping], key: str) -> np.ndarray:
    """float32[N]: the per-shard arrays under ``key`` end to end (rows without it add nothing)."""
    parts = [np.asarray(r[key], dtype=np.float32).reshape(-1) for r in rows if r.get(key) is not None]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def throughput_series(rows: Sequence[Mapping], max_bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Images per second over time from the shards' commit times.

    The images of a shard are spread evenly over the gap between the previous commit and its own
    (``written_at``), which makes the cumulative count piecewise linear; the span from the first to
    the last commit is cut into at most ``max_bins`` equal bins (at most one per commit) and a bin's
    rate is that count's increase over its width. The first shard's images are left out: the work
    before the first commit has no start time to divide by.

    Returns:
        (edges, rate): float64[K + 1] bin edges in seconds since the first commit and float64[K]
        images/s; both empty with fewer than two distinct commit times.
    """
    times = np.array([float(r.get("written_at", 0.0)) for r in rows], np.float64)
    images = np.array([float(r.get("images", 0)) for r in rows], np.float64)
    if times.size < 2 or np.ptp(times) <= 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(times, kind="stable")
    t = times[order] - times[order[0]]
    done = np.concatenate([[0.0], np.cumsum(images[order][1:])])        # images finished by t[i]
    edges = np.linspace(0.0, t[-1], min(times.size - 1, max_bins) + 1)
    return edges, np.diff(np.interp(edges, t, done)) / np.diff(edges)


def run_align(output: str, run_id: str | None, crop_side: int, storage_options: dict | None):
    """The AlignConfig the run used (from its typed run record), sized to the stored crops; the default
    framing where the record is missing or unreadable (logged)."""
    from workers.faces.config import AlignConfig
    from workers.runs import read_prepare_record

    if run_id:
        try:
            align = read_prepare_record(output, run_id, storage_options).config.engine.align
            return AlignConfig(size=crop_side, margin=align.margin, template=align.template)
        except Exception as exc:  # noqa: BLE001 - a missing or older record: the default framing
            log.info("run record of %s unreadable (%s); assuming the default alignment", run_id, exc)
    return AlignConfig(size=crop_side)


def sample_faces(output: str, rows: Sequence[Mapping], storage_options: dict | None, n: int = NUM_SAMPLES):
    """Up to ``n`` faces spread over the first committed shards of the run (a pushed-down shard filter)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from workers import dataset

    shards = [r["shard"] for r in sorted(rows, key=lambda r: float(r.get("written_at", 0.0)))
              if int(r.get("faces", 0)) > 0][:MAX_SAMPLE_SHARDS]
    if not shards:
        return None
    dataset.require_dataset(output, storage_options)
    table = dataset.read_table(output, S.FACES, storage_options, columns=list(SAMPLE_COLUMNS),
                               filter=pc.field(S.SHARD).isin(shards))
    if table.num_rows == 0:
        return None
    take = np.unique(np.linspace(0, table.num_rows - 1, min(n, table.num_rows)).round().astype(np.int64))
    return table.take(pa.array(take))
