"""The prepare graph on Ray Data: list -> shard -> decode (CPU tasks) -> faces (actor pool) -> commit (CPU tasks).

What to do comes from the dataset's current rows (:func:`files_to_do`): a file is done when its image row
has the same input fingerprint and was made with the same settings, unless it recorded a transient error
(``schemas.TRANSIENT_ERRORS``) or the run asks to retry errors. The files to do are sorted by uri and cut
into shards of ``shard_size`` (the first ones smaller, :func:`shard_sizes`, so that the first shard commits
within seconds); each shard commits in one Delta transaction (:mod:`workers.dataset`), so a
killed run leaves whole shards or nothing, and the rerun does exactly the rest. Nothing but one small
summary row per shard ever comes back to the driver.

Ray Data fuses decode into the face actor when their resource requests are equal (CPU-only runs, where
it saves a copy); with GPUs the actor asks for ``num_gpus`` and decode runs in separate CPU tasks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections import Counter

import numpy as np
import pandas as pd

import schemas as S
from workers import dataset, inputs, storage
from workers.actors import ActorConfig, FaceActor, decode_shard, write_shard
from workers.decode import DecodeConfig
from workers.faces.config import EngineConfig, check_precision
from workers.graph import PoolSettings, Stage, check_cluster, plan_pool, run_shard_graph
from workers.report import write_prepare_report
from workers.runs import check_run_id, new_run_id, write_run_record


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Everything one prepare run needs.

    Attributes:
        input: folder, manifest (.csv/.parquet) or s3:// URI of the images.
        output: dataset root (local or s3://).
        embedder: registry name (``sface``) or an exported embedder directory.
        engine: detection / alignment settings.
        decode: decode limits.
        shard_size: images per output shard (and per decode task); a run's first shards are smaller
            (:func:`shard_sizes`).
        pool: the face actors' pool (actors, GPU / CPU shares, torch threads, shards per call, device).
        crop_quality: JPEG quality of stored crops.
        storage_options: fsspec options for input and output (e.g. endpoint_url).
        run_id: recorded in every row ("" = generated): letters, digits, ``.``, ``_``, ``-``.
        retry_errors: reprocess every error row, not only transient ones (``schemas.TRANSIENT_ERRORS``).
        shared_fs: local --input/--output paths are on a filesystem every Ray node sees (a shared mount).
    """

    input: str
    output: str
    embedder: str = "sface"
    engine: EngineConfig = EngineConfig()
    decode: DecodeConfig = DecodeConfig()
    shard_size: int = 256
    pool: PoolSettings = PoolSettings()
    crop_quality: int = 95
    storage_options: tuple[tuple[str, str], ...] = ()
    run_id: str = ""
    retry_errors: bool = False
    shared_fs: bool = False

    def __post_init__(self):
        if not 1 <= self.shard_size <= dataset.MAX_COMMIT_URIS:
            raise ValueError(f"shard_size must be in [1, {dataset.MAX_COMMIT_URIS}] (one shard is one commit), "
                             f"got {self.shard_size}")
        if not 1 <= self.crop_quality <= 100:
            raise ValueError(f"crop_quality must be in [1, 100], got {self.crop_quality}")
        check_run_id(self.run_id)
        device = self.pool.device
        check_precision(self.engine.embed_precision, None if device == "auto" else device)


def settings_digest(cfg: "PrepareConfig", embedder_name: str, embedder_version: str) -> str:
    """Digest of everything that shapes a prepare row: detection, alignment, embedding precision, decode
    limits, crop quality and the embedder (name and version). A rerun with other settings redoes the rows
    made with the old ones."""
    shaping = {"engine": dataclasses.asdict(cfg.engine), "decode": dataclasses.asdict(cfg.decode),
               "crop_quality": cfg.crop_quality, "embedder": [embedder_name, embedder_version],
               "schema": S.SCHEMA_VERSION}
    return hashlib.sha1(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: The first shards of a run hold this many images (or ``shard_size`` if smaller), and the size doubles
#: every ``shards_per_call`` shards up to ``shard_size``: the first commit waits for one small actor call,
#: not for ``shards_per_call x shard_size`` images (512 by default, ~15 s on 2 CPUs; docs/performance.md).
FIRST_SHARD_SIZE = 8


def shard_sizes(n: int, shard_size: int, shards_per_call: int = 1, first: int = FIRST_SHARD_SIZE) -> list[int]:
    """Images per shard for ``n`` files: ``shards_per_call`` shards of ``min(first, shard_size)`` images,
    as many of twice that, and so on up to ``shard_size``; the last shard takes the rest."""
    sizes, size = [], max(1, min(first, shard_size))
    while n > 0:
        for _ in range(shards_per_call):
            if n <= 0:
                break
            sizes.append(min(size, n))
            n -= sizes[-1]
        size = min(2 * size, shard_size)
    return sizes


def plan_shards(todo: pd.DataFrame, shard_size: int, salt: str = "", shards_per_call: int = 1) -> list[dict]:
    """Cut the sorted files to do into shard rows (:func:`shard_sizes`: small first shards, growing to
    ``shard_size``), keyed by a digest of their uris, fingerprints and ``salt`` (the run id and settings:
    a shard key is never reused by another run)."""
    todo = todo.sort_values(S.URI, ignore_index=True)
    shards, start = [], 0
    for size in shard_sizes(len(todo), shard_size, shards_per_call):
        part = todo.iloc[start:start + size]
        start += size
        members = [salt] + [f"{u}|{'' if pd.isna(f) else f}" for u, f in zip(part[S.URI], part[S.FINGERPRINT])]
        key = hashlib.sha1("\n".join(members).encode()).hexdigest()[:20]
        shards.append({
            "shard": f"part-{key}", "uris": part[S.URI].tolist(),
            "identities": [None if pd.isna(v) else str(v) for v in part[S.IDENTITY]],
            "fingerprints": [None if pd.isna(v) else str(v) for v in part[S.FINGERPRINT]],
        })
    return shards


def files_to_do(listed: pd.DataFrame, done: pd.DataFrame, settings: str, retry_errors: bool = False) -> pd.DataFrame:
    """The listed files whose current row does not answer for them.

    A file is done when its image row has the same (known) input fingerprint and the same settings
    digest, and is not an error to retry: transient reasons (``schemas.TRANSIENT_ERRORS``) always are,
    the others with ``retry_errors``.

    Args:
        listed: uri, fingerprint (and more) per input file.
        done: the dataset's image rows: uri, fingerprint, settings, status, error.
        settings: this run's :func:`settings_digest`.
        retry_errors: redo every error row.
    """
    if done.empty:
        return listed
    old = done[[S.URI, S.FINGERPRINT, S.SETTINGS, S.STATUS, S.ERROR]].rename(
        columns={S.FINGERPRINT: "_fp", S.SETTINGS: "_settings", S.STATUS: "_status", S.ERROR: "_error"})
    m = listed.merge(old, on=S.URI, how="left")
    same = (m[S.FINGERPRINT].notna() & m["_fp"].notna() & (m[S.FINGERPRINT] == m["_fp"])
            & (m["_settings"] == settings))
    error = m["_status"] == S.STATUS_ERROR
    retry = error & (m["_error"].isin(S.TRANSIENT_ERRORS) | retry_errors)
    return listed[(~same | retry).to_numpy()].reset_index(drop=True)


@dataclasses.dataclass(frozen=True)
class Checked:
    """What :func:`check_prepare` found: the listing and the embedder that will run."""

    inputs: pd.DataFrame
    skipped: dict
    embedder_name: str
    embedder_version: str
    embedding_dim: int


def check_prepare(cfg: PrepareConfig) -> Checked:
    """Everything that can fail before any work: the embedder, the output (a new or empty folder, or a
    facemill dataset; writable), and the input listing.

    Raises:
        storage.StorageError: input missing/empty/bad manifest, output foreign or not writable.
        ValueError: unknown embedder.
        WeightsNotFound: a registry model's package is missing.
    """
    from workers.faces.weights import check_embedder

    opts = dict(cfg.storage_options)
    spec = check_embedder(cfg.embedder)
    dataset.check_output(cfg.output, opts)
    listed, skipped = inputs.list_inputs(cfg.input, opts)
    storage.check_writable(cfg.output, opts)
    return Checked(listed, skipped, spec.name, spec.version, spec.embedding_dim)


def run_prepare(cfg: PrepareConfig, log=print, checked: Checked | None = None, lease=None) -> dict:
    """Run prepare on the connected Ray cluster; returns (and writes) the run summary.

    Args:
        cfg: the run (``cfg.run_id`` is generated when empty).
        log: progress lines go here.
        checked: the result of :func:`check_prepare`, if the caller already ran it.
        lease: the output's run lease (:func:`workers.lease.take_lease`) if the caller took it (jobs take it
            before Ray starts); else it is taken and released here.

    Raises:
        storage.StorageError: input missing/empty, output foreign, not writable, or in use by another run.
        ValueError: unknown embedder; a setting the cluster cannot run.
    """
    from workers.lease import take_lease

    t0 = time.time()
    opts = dict(cfg.storage_options)
    if not cfg.run_id:
        cfg = dataclasses.replace(cfg, run_id=new_run_id())
    run_id = cfg.run_id
    checked = checked if checked is not None else check_prepare(cfg)
    own = lease is None
    lease = take_lease(cfg.output, run_id, "prepare", opts) if own else lease
    try:
        check_cluster([cfg.input, cfg.output], cfg.pool.device, cfg.engine.embed_precision, cfg.shared_fs)
        dataset.create_dataset(cfg.output, checked.embedding_dim, opts)
        settings = settings_digest(cfg, checked.embedder_name, checked.embedder_version)
        done = dataset.read_table(cfg.output, S.IMAGES, opts,
                                  columns=[S.URI, S.FINGERPRINT, S.SETTINGS, S.STATUS, S.ERROR])
        listed = checked.inputs
        todo = files_to_do(listed, done.to_pandas(), settings, cfg.retry_errors)
        shards = plan_shards(todo, cfg.shard_size, salt=f"{run_id}|{settings}",
                             shards_per_call=cfg.pool.shards_per_call)
        log(f"facemill prepare {run_id}: {len(listed)} images listed, {len(listed) - len(todo)} already done, "
            f"{len(todo)} to do in {len(shards)} shards")
        rows = _run_graph(cfg, shards, settings, opts, log, lease) if shards else []
        lease.check()
        version = dataset.table_version(dataset.records_uri(cfg.output), opts)
        summary = _summarise(cfg, run_id, rows, len(listed), len(listed) - len(todo), checked.skipped, t0)
        summary.update(settings=settings, table_version=version, nothing_to_do=not shards)
        write_run_record(cfg.output, summary, cfg, opts)
        if shards:  # a run that did nothing leaves the last real run's summary and report in place
            storage.write_json(storage.join(cfg.output, "summary.json"), summary, opts)
            write_prepare_report(cfg.output, summary, rows, opts)  # never raises: a report is not worth a run
            dataset.vacuum(dataset.records_uri(cfg.output), opts)
    finally:
        if own:
            lease.release()
    return summary


def _run_graph(cfg: PrepareConfig, shards: list[dict], settings: str, opts: dict, log, lease) -> list[dict]:
    pool = cfg.pool
    plan = plan_pool(pool, feeding_cpus=1.0, fused_on_cpu=pool.cpus_per_actor == 1)  # decode asks for 1 CPU
    actor_cfg = ActorConfig(engine=cfg.engine, embedder=cfg.embedder, device=pool.device, run_id=cfg.run_id,
                            settings=settings, torch_threads=plan.threads)
    read = Stage(decode_shard, {"storage_options": opts, "decode": cfg.decode}, cpus=1)
    commit = Stage(write_shard, {"output": cfg.output, "storage_options": opts, "crop_quality": cfg.crop_quality})
    rows, n_img, t0, last = [], 0, time.time(), 0.0
    total = sum(len(s["uris"]) for s in shards)
    for row in run_shard_graph(shards, read, FaceActor, actor_cfg, pool, plan, commit):
        lease.check()  # a run that lost its lease stops here
        rows.append(row)
        n_img += row["images"]
        now = time.time()
        if now - last > 5 or len(rows) == len(shards):
            rate = n_img / max(now - t0, 1e-9)
            log(f"  {len(rows)}/{len(shards)} shards, {n_img}/{total} images, {rate:.1f} img/s")
            last = now
    return rows


def _summarise(cfg, run_id, rows, listed, already, skipped, t0) -> dict:
    wall = time.time() - t0
    reasons = Counter()
    for r in rows:
        reasons.update(json.loads(r["reasons"]))
    n = int(sum(r["images"] for r in rows))
    sizes = np.concatenate([np.asarray(r["face_sizes"]) for r in rows]) if rows else np.zeros(0)
    return {
        "run_id": run_id, "input": cfg.input, "output": cfg.output, "embedder": cfg.embedder,
        "schema_version": S.SCHEMA_VERSION, "images_listed": listed, "images_already_done": already,
        "images_in": n, "images_with_faces": int(sum(r["ok"] for r in rows)),
        "images_no_face": int(sum(r["no_face"] for r in rows)), "images_error": int(sum(r["error"] for r in rows)),
        "errors_by_reason": dict(reasons), "faces": int(sum(r["faces"] for r in rows)),
        "shards": len(rows), "skipped_non_image_files": len(skipped.get("not_an_image_extension", [])),
        "skipped_by_reason": {k: len(v) for k, v in skipped.items() if v},
        "skipped_examples": [u for v in skipped.values() for u in v][:5],
        "median_face_size_px": float(np.median(sizes)) if sizes.size else None,
        "wall_time_s": round(wall, 3), "images_per_s": round(n / wall, 2) if wall > 0 else None,
    }


def print_summary(summary: dict, out=sys.stdout) -> None:
    """Human-readable summary lines."""
    s = summary
    if s.get("nothing_to_do"):
        print(f"facemill prepare {s['run_id']}: nothing to do, all {s['images_listed']} images are already in "
              f"{s['output']} (records table version {s.get('table_version')}; summary.json and report.html "
              f"are the last run's)", file=out)
        return
    print(f"facemill prepare {s['run_id']}: {s['images_in']} images in "
          f"({s['images_already_done']} already done), {s['images_with_faces']} with faces, "
          f"{s['images_no_face']} no face, {s['images_error']} errors"
          f"{' ' + json.dumps(s['errors_by_reason']) if s['errors_by_reason'] else ''}, "
          f"{s['faces']} faces; {s['wall_time_s']:.1f} s, {s['images_per_s'] or 0:.1f} img/s", file=out)
    print(f"output: {s['output']} (summary.json, report.html)", file=out)
