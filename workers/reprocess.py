"""reprocess: re-embed a prepared dataset with another embedder, or bring it up to date with its input.

Re-embed (:func:`run_reembed`) works from the stored aligned crops, without detecting again. The graph
has the shape of prepare's: one row per faces shard of the current records ->

    read_crops (CPU task: the shard's face rows -> decoded crops) -> EmbedActor (actor pool, GPU if present)
    -> write_embeddings (CPU task: one Delta commit replacing the shard's rows of ``embeddings/<name>``)

Visibility rules are those of :func:`workers.dataset.read_embeddings`. A shard is skipped when the table
already holds it from the same embedder and version, so a rerun does only what is missing; rows of faces
that are no longer current are deleted.

Incremental (:func:`run_incremental`) is prepare itself: ``run_prepare`` lists the input, skips files
already committed with the same fingerprint and processes only new or changed ones (latest wins).

Both take the dataset root's run lease (:func:`workers.lease.take_lease`), so no two runs of prepare or
reprocess ever work on one dataset at once.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pyarrow as pa

import schemas as S
from workers import dataset, records, storage
from workers.graph import PoolSettings, Stage, check_cluster, plan_pool, run_shard_graph
from workers.runs import check_run_id, new_run_id, write_run_record

_META_COLUMNS = [S.IMAGE_ID, S.URI, S.IDENTITY, S.SHARD, S.FACE_INDEX]
#: CPUs of a read_crops task (reading and decoding a shard's stored JPEG crops is light).
READ_CPUS = 0.5


@dataclasses.dataclass(frozen=True)
class ReembedConfig:
    """One re-embed run.

    Attributes:
        root: dataset root written by prepare (local or s3://).
        embedder: registry name (``sface``) or an exported embedder directory / URI.
        name: embeddings table name under ``<root>/embeddings/`` ("" = the embedder's ``spec.name``).
        pool: the embed actors' pool (actors, GPU / CPU shares, torch threads, shards per call, device).
        batch_size: crops per forward pass (0: by device, see ``embedders.default_embed_batch``).
        precision: embedder precision, "float32", "bfloat16" or "float16" (CUDA); see
            ``EngineConfig.embed_precision``.
        storage_options: fsspec options.
        run_id: recorded in every row ("" = generated).
        shared_fs: a local root is on a filesystem every Ray node sees.
    """

    root: str
    embedder: str = "sface"
    name: str = ""
    pool: PoolSettings = PoolSettings()
    batch_size: int = 0
    precision: str = "float32"
    storage_options: tuple[tuple[str, str], ...] = ()
    run_id: str = ""
    shared_fs: bool = False

    def __post_init__(self):
        from workers.faces.config import check_precision

        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0: by device), got {self.batch_size}")
        check_precision(self.precision, None if self.pool.device == "auto" else self.pool.device)
        check_run_id(self.run_id)
        if self.name:
            dataset.embeddings_uri("", self.name)  # validates the name


@dataclasses.dataclass(frozen=True)
class EmbedActorConfig:
    """What an embed actor loads and how it runs (see :class:`ReembedConfig`)."""

    embedder: str = "sface"
    device: str = "auto"
    batch_size: int = 0
    torch_threads: int = 0
    run_id: str = ""
    precision: str = "float32"


# --------------------------------------------------------------------------------------------------
# Ray-side callables (plain functions and a callable class; testable without Ray)
# --------------------------------------------------------------------------------------------------

def read_crops(row: dict, *, root: str, storage_options: dict | None) -> dict:
    """Read the current face rows of one shard and decode their stored crops.

    Args:
        row: shard (key).
        root: dataset root.
        storage_options: fsspec options.

    Returns:
        The row plus meta_ipc (Arrow IPC of the faces' id columns), crops (the RGB bytes of
        uint8[F, S, S, 3]), num_crops F, crop_size S and bad_crops (stored crops that did not decode;
        their faces are left out).
    """
    faces = dataset.read_shard_faces(root, row["shard"], _META_COLUMNS + [S.CROP], storage_options)
    crops, ok = records.decode_crops_checked(faces.column(S.CROP))
    meta = faces.select(_META_COLUMNS)
    if not ok.all():
        meta = meta.filter(pa.array(ok))
    return {**row, "meta_ipc": records.table_to_ipc(meta), "crops": np.ascontiguousarray(crops).tobytes(),
            "num_crops": int(crops.shape[0]), "crop_size": int(crops.shape[1]) if crops.size else 0,
            "bad_crops": int((~ok).sum())}


def embeddings_table(meta: pa.Table, embeddings: np.ndarray, embedder: str, embedder_version: str,
                     run_id: str) -> pa.Table:
    """Rows of ``schemas.embeddings_schema(D)``.

    Args:
        meta: the faces' image_id, uri, identity, shard, face_index columns (F rows).
        embeddings: float32[F, D] unit vectors.
        embedder, embedder_version: the model's spec name and version.
        run_id: the run writing the rows.
    """
    n, dim = embeddings.shape
    if meta.num_rows != n:
        raise ValueError(f"{meta.num_rows} faces but {n} embeddings")
    flat = pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1), pa.float32())
    schema = S.embeddings_schema(dim)
    columns = {name: meta.column(name) for name in _META_COLUMNS}
    return pa.table({
        **columns,
        S.EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, dim),
        S.EMBEDDER: pa.array([embedder] * n, pa.string()),
        S.EMBEDDER_VERSION: pa.array([embedder_version] * n, pa.string()),
        S.RUN_ID: pa.array([run_id] * n, pa.string()),
    }, schema=schema)


class EmbedActor:
    """Ray Data callable class: loads the embedder once, then embeds the crops of batches of shards."""

    def __init__(self, config: EmbedActorConfig):
        import torch

        from workers.faces.embedders import load_embedder

        device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.embedder = load_embedder(config.embedder, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed the crops of several shards in one pass.

        Args:
            batch: columns of :func:`read_crops` rows.

        Returns:
            Columns shard, bad_crops, embedder, embedder_version (the spec that ran) and table_ipc (the shard's embeddings rows, ``schemas.embeddings_schema``, as Arrow IPC).
        """
        spec = self.embedder.spec
        height, width = spec.input_size
        counts = np.asarray(batch["num_crops"], np.int64)
        for size, count in zip(batch["crop_size"], counts):
            if count and (int(size), int(size)) != (height, width):
                raise ValueError(f"stored crops are {size}x{size}, embedder {spec.name!r} needs {height}x{width}")
        crops = np.concatenate([np.frombuffer(b, np.uint8) for b in batch["crops"]]).reshape(-1, height, width, 3)
        vectors = self.embedder.embed(crops, batch_size=self.config.batch_size,
                                      precision=self.config.precision)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        tables = [records.table_to_ipc(embeddings_table(records.table_from_ipc(batch["meta_ipc"][i]),
                                                        vectors[bounds[i]:bounds[i + 1]], spec.name,
                                                        spec.version, self.config.run_id))
                  for i in range(len(counts))]  # per shard of the call: slices of one result
        n = len(counts)
        return {"shard": np.asarray(batch["shard"]), "bad_crops": np.asarray(batch["bad_crops"]), "embedder": np.array([spec.name] * n),
                "embedder_version": np.array([spec.version] * n), "table_ipc": np.array(tables, dtype=object)}


def write_embeddings(row: dict, *, root: str, name: str, storage_options: dict | None) -> dict:
    """Commit one shard of embeddings table ``name`` (one Delta transaction); returns its summary row."""
    table = records.table_from_ipc(row["table_ipc"])
    dataset.commit_embeddings(root, name, row["shard"], table, storage_options)
    return {"shard": row["shard"], "faces": table.num_rows, "bad_crops": int(row["bad_crops"]),
            "written_at": time.time(), "pid": os.getpid()}


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------

def shards_to_embed(faces_per_shard, done, embedder: str, version: str) -> list[dict]:
    """Faces shards without current embeddings of this embedder version, in shard order.

    Args:
        faces_per_shard: shard -> current faces (:func:`workers.dataset.face_shards`).
        done: distinct shard, embedder, embedder_version rows of the embeddings table.
        embedder, version: the embedder's spec name and version.

    Returns:
        Rows {shard, faces}.
    """
    same = done[(done[S.EMBEDDER] == embedder) & (done[S.EMBEDDER_VERSION] == version)]
    have = set(same[S.SHARD])
    return [{"shard": str(shard), "faces": int(n)} for shard, n in faces_per_shard.items() if shard not in have]


def run_reembed(cfg: ReembedConfig, log=print, lease=None) -> dict:
    """Re-embed every faces shard of ``cfg.root`` not yet embedded by this embedder version.

    Returns (and writes to ``<root>/embeddings/<name>/summary.json`` and ``<root>/_runs/<run_id>.json``)
    the run summary: shards/faces done and skipped, the table name and version, the embedder and
    ``nothing_to_do``.

    Args:
        cfg: the run.
        log: progress lines go here.
        lease: the root's run lease if the caller took it, else it is taken and released here.

    Raises:
        storage.StorageError: no dataset at the root, not writable, or in use by another run.
        ValueError: unknown or broken embedder, bad table name, a setting the cluster cannot run.
    """
    from workers.faces.weights import check_embedder
    from workers.lease import take_lease

    t0 = time.time()
    opts = dict(cfg.storage_options)
    run_id = cfg.run_id or new_run_id()
    spec = check_embedder(cfg.embedder)  # fail fast on an unknown or broken embedder
    name = cfg.name or spec.name
    eroot = dataset.embeddings_uri(cfg.root, name)
    dataset.require_dataset(cfg.root, opts)
    storage.check_writable(cfg.root, opts)
    own = lease is None
    lease = take_lease(cfg.root, run_id, "reprocess", opts) if own else lease
    try:
        check_cluster([cfg.root], cfg.pool.device, cfg.precision, cfg.shared_fs)
        per_shard = dataset.face_shards(cfg.root, opts)
        if per_shard.empty:
            raise ValueError(f"{cfg.root!r} holds no faces: run prepare first")
        done = dataset.embedded_shards(cfg.root, name, opts)
        stale = sorted(set(done[S.SHARD]) - set(per_shard.index))
        dataset.delete_embeddings(cfg.root, name, stale, opts)
        todo = shards_to_embed(per_shard, done, spec.name, spec.version)
        faces_todo = sum(r["faces"] for r in todo)
        log(f"facemill reprocess {run_id}: re-embed {cfg.root} with {spec.name} {spec.version} into "
            f"embeddings/{name}: {len(per_shard)} shards, {len(per_shard) - len(todo)} already done, "
            f"{len(todo)} to do ({faces_todo} faces)" + (f"; {len(stale)} stale shards deleted" if stale else ""))
        rows = _run_graph(cfg, todo, name, run_id, opts) if todo else []
        lease.check()
        summary = {
            "run_id": run_id, "mode": "reembed", "root": cfg.root, "table": f"{S.EMBEDDINGS}/{name}",
            "embedder": spec.name, "embedder_version": spec.version, "embedder_source": cfg.embedder,
            "shards": len(per_shard), "shards_done": len(rows), "shards_skipped": len(per_shard) - len(todo),
            "faces": int(sum(r["faces"] for r in rows)), "bad_crops": int(sum(r["bad_crops"] for r in rows)),
            "nothing_to_do": not todo, "schema_version": S.SCHEMA_VERSION,
            "table_version": dataset.table_version(eroot, opts), "wall_time_s": round(time.time() - t0, 3),
        }
        if todo:
            storage.write_json(storage.join(eroot, "summary.json"), summary, opts)
            dataset.vacuum(eroot, opts)
        write_run_record(cfg.root, summary, cfg, opts)
    finally:
        if own:
            lease.release()
    return summary


def _run_graph(cfg: ReembedConfig, todo: list[dict], name: str, run_id: str, opts: dict) -> list[dict]:
    plan = plan_pool(cfg.pool, feeding_cpus=READ_CPUS)
    actor_cfg = EmbedActorConfig(embedder=cfg.embedder, device=cfg.pool.device, batch_size=cfg.batch_size,
                                 precision=cfg.precision, run_id=run_id, torch_threads=plan.threads)
    read = Stage(read_crops, {"root": cfg.root, "storage_options": opts}, cpus=READ_CPUS)
    commit = Stage(write_embeddings, {"root": cfg.root, "name": name, "storage_options": opts})
    return list(run_shard_graph(todo, read, EmbedActor, actor_cfg, cfg.pool, plan, commit))


def run_incremental(cfg, log=print, lease=None, checked=None) -> dict:
    """Process only the new or changed files of ``cfg.input`` into ``cfg.output`` (prepare's own skip).

    Args:
        cfg: a :class:`workers.pipeline.PrepareConfig`.

    Returns:
        prepare's summary plus ``mode`` "incremental" and ``nothing_to_do`` (no file was new or changed).
    """
    from workers.pipeline import run_prepare

    summary = run_prepare(cfg, log=log, lease=lease, checked=checked)
    summary = {**summary, "mode": "incremental"}
    if summary["nothing_to_do"]:
        log(f"facemill reprocess {summary['run_id']}: nothing to do ({summary['images_listed']} images listed, "
            f"all already processed and unchanged)")
    return summary
