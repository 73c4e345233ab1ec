"""reprocess: re-embed a prepared dataset with another embedder, or bring it up to date with its input.

Re-embed (:func:`run_reembed`) works from the stored aligned crops, without detecting again. The graph
has the shape of prepare's: one row per committed faces shard ->

    read_crops (CPU task: faces parquet -> decoded crops) -> EmbedActor (actor pool, GPU if present)
    -> write_embeddings (CPU task: commit ``<root>/embeddings/<name>/<shard>.parquet`` + marker)

Layout and visibility rules are those of :func:`workers.storage.commit_embeddings`. A shard is skipped
when its embeddings marker names the same embedder and version and the faces shard is unchanged, so a
rerun does only what is missing.

Incremental (:func:`run_incremental`) is prepare itself: ``run_prepare`` lists the input, skips files
already committed with the same fingerprint and processes only new or changed ones (latest wins).

Both take the dataset root's run lock (:func:`workers.storage.acquire_lock`), so no two runs of
prepare or reprocess ever write one dataset at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas as S
from workers import records, storage

_META_COLUMNS = [S.IMAGE_ID, S.URI, S.IDENTITY, S.SHARD, S.FACE_INDEX]


@dataclasses.dataclass(frozen=True)
class ReembedConfig:
    """One re-embed run.

    Attributes:
        root: dataset root written by prepare (local or s3://).
        embedder: registry name (``sface``) or an exported embedder directory / URI.
        name: embeddings table name under ``<root>/embeddings/`` ("" = the embedder's ``spec.name``).
        shards_per_call: faces shards handed to one actor call.
        actors: embed actors (0: one per GPU, or 1 without GPUs).
        gpus_per_actor: GPU share of each actor when the cluster has GPUs.
        cpus_per_actor: CPUs reserved by each actor.
        device: "auto", "cuda" or "cpu" for the actors.
        batch_size: crops per forward pass (0: by device, see ``embedders.default_embed_batch``).
        precision: embedder precision, "float32", "bfloat16" or "float16" (CUDA); see
            ``EngineConfig.embed_precision``.
        torch_threads: intra-op threads per actor (0: ``workers.pipeline.actor_threads``).
        storage_options: fsspec options.
        run_id: recorded in every row ("" = generated).
        force_unlock: take the root's lock even if another run seems to hold it.
    """

    root: str
    embedder: str = "sface"
    name: str = ""
    shards_per_call: int = 2
    actors: int = 0
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    device: str = "auto"
    batch_size: int = 0
    precision: str = "float32"
    torch_threads: int = 0
    storage_options: tuple[tuple[str, str], ...] = ()
    run_id: str = ""
    force_unlock: bool = False

    def __post_init__(self):
        if self.shards_per_call < 1:
            raise ValueError(f"shards_per_call must be >= 1, got {self.shards_per_call}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0: by device), got {self.batch_size}")
        from workers.faces.embedders import check_precision

        check_precision(self.precision, None if self.device == "auto" else self.device)
        if not 0 < self.gpus_per_actor <= 8:
            raise ValueError(f"gpus_per_actor must be in (0, 8], got {self.gpus_per_actor}")
        if self.name:
            storage.embeddings_root("", self.name)  # validates the name


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

def _decode_each(encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Decode crops one by one: (uint8[K, S, S, 3] of the decodable ones, bool[N] decodable)."""
    ok, crops = np.zeros(len(encoded), bool), []
    for i, blob in enumerate(encoded):  # only after a whole-shard decode failed
        try:
            crops.append(records.decode_crops([blob])[0])
            ok[i] = True
        except Exception:  # noqa: BLE001 - a corrupt stored crop is counted, not raised
            pass
    return (np.stack(crops) if crops else np.zeros((0, 112, 112, 3), np.uint8)), ok


def read_crops(row: dict, *, root: str, storage_options: dict | None) -> dict:
    """Read one committed faces shard and decode its stored crops.

    Args:
        row: shard (key) and faces_committed_at (its marker's time).
        root: dataset root.
        storage_options: fsspec options.

    Returns:
        The row plus meta_ipc (Arrow IPC of the faces' id columns), crops (the RGB bytes of
        uint8[F, S, S, 3]), num_crops F, crop_size S and bad_crops (stored crops that did not decode;
        their faces are left out).
    """
    path = storage.join(root, S.FACES, f"{row['shard']}.parquet")
    fs, fpath = storage.url_to_fs(path, storage_options)
    faces = pq.read_table(fpath, filesystem=fs, columns=_META_COLUMNS + [S.CROP])
    encoded = faces.column(S.CROP).to_pylist()
    try:
        crops, ok = records.decode_crops(encoded), np.ones(len(encoded), bool)
    except Exception:  # noqa: BLE001 - find the bad crops
        crops, ok = _decode_each(encoded)
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
            Columns shard, faces_committed_at, bad_crops, embedder, embedder_version (the spec that ran)
            and table_ipc (the shard's embeddings rows, ``schemas.embeddings_schema``, as Arrow IPC).
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
        return {"shard": np.asarray(batch["shard"]), "faces_committed_at": np.asarray(batch["faces_committed_at"]),
                "bad_crops": np.asarray(batch["bad_crops"]), "embedder": np.array([spec.name] * n),
                "embedder_version": np.array([spec.version] * n), "table_ipc": np.array(tables, dtype=object)}


def write_embeddings(row: dict, *, root: str, name: str, embedder_source: str,
                     storage_options: dict | None) -> dict:
    """Commit one shard of embeddings table ``name``; returns its summary row."""
    table = records.table_from_ipc(row["table_ipc"])
    marker = {"embedder": str(row["embedder"]), "embedder_version": str(row["embedder_version"]),
              "embedder_source": embedder_source, "faces_committed_at": float(row["faces_committed_at"]),
              "bad_crops": int(row["bad_crops"])}
    storage.commit_embeddings(root, name, row["shard"], table, marker, storage_options)
    return {"shard": row["shard"], "faces": table.num_rows, "bad_crops": int(row["bad_crops"]),
            "written_at": time.time(), "pid": os.getpid()}


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------

def shards_to_embed(markers: dict[str, dict], done: dict[str, dict], embedder: str, version: str) -> list[dict]:
    """Faces shards without a current embeddings shard of this embedder version, oldest first.

    Args:
        markers: the dataset's commit markers (shard -> marker).
        done: the embeddings table's current markers (:func:`storage.current_embeddings`).
        embedder, version: the embedder's spec name and version.

    Returns:
        Rows {shard, faces_committed_at}.
    """
    todo = []
    for shard, m in sorted(markers.items(), key=lambda kv: kv[1]["committed_at"]):
        if S.FACES not in m.get("tables", ()):
            continue
        d = done.get(shard)
        if d and d.get("embedder") == embedder and d.get("embedder_version") == version:
            continue
        todo.append({"shard": shard, "faces_committed_at": float(m["committed_at"])})
    return todo


def _resources(cfg: ReembedConfig) -> tuple[int, float]:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if cfg.device != "cpu" else 0
    if gpus:
        return cfg.actors or max(1, int(gpus // cfg.gpus_per_actor)), cfg.gpus_per_actor
    return cfg.actors or 1, 0.0


def run_reembed(cfg: ReembedConfig, log=print) -> dict:
    """Re-embed every committed faces shard of ``cfg.root`` not yet embedded by this embedder version.

    Returns (and writes to ``<root>/embeddings/<name>/summary.json`` and ``<root>/_runs/<run_id>.json``)
    the run summary: shards/faces done and skipped, the table name, the embedder and ``nothing_to_do``.

    Raises:
        storage.StorageError: root not writable, or locked by another run.
        ValueError: unknown or broken embedder, bad table name, no committed faces at ``cfg.root``.
    """
    from workers.faces.embedders import load_embedder
    from workers.pipeline import new_run_id

    t0 = time.time()
    opts = dict(cfg.storage_options)
    run_id = cfg.run_id or new_run_id()
    spec = load_embedder(cfg.embedder).spec  # fail fast on an unknown or broken embedder
    name = cfg.name or spec.name
    eroot = storage.embeddings_root(cfg.root, name)
    storage.check_writable(cfg.root, opts)
    storage.acquire_lock(cfg.root, run_id, opts, force=cfg.force_unlock)
    try:
        markers = storage.committed(cfg.root, opts)
        if not markers:
            raise ValueError(f"{cfg.root!r} holds no committed shards: run prepare first")
        removed = storage.remove_uncommitted_embeddings(cfg.root, name, opts)
        done = storage.current_embeddings(cfg.root, name, opts, markers)
        todo = shards_to_embed(markers, done, spec.name, spec.version)
        faces_todo = sum(int(markers[r["shard"]].get("faces", 0)) for r in todo)
        log(f"facemill reprocess {run_id}: re-embed {cfg.root} with {spec.name} {spec.version} into "
            f"embeddings/{name}: {len(markers)} shards, {len(markers) - len(todo)} already done, "
            f"{len(todo)} to do ({faces_todo} faces)" + (f"; removed {removed} partial files" if removed else ""))
        rows = _run_graph(cfg, todo, name, run_id, opts) if todo else []
        summary = {
            "run_id": run_id, "mode": "reembed", "root": cfg.root, "table": f"{S.EMBEDDINGS}/{name}",
            "embedder": spec.name, "embedder_version": spec.version, "embedder_source": cfg.embedder,
            "shards": len(markers), "shards_done": len(rows), "shards_skipped": len(markers) - len(todo),
            "faces": int(sum(r["faces"] for r in rows)), "bad_crops": int(sum(r["bad_crops"] for r in rows)),
            "nothing_to_do": not todo, "schema_version": S.SCHEMA_VERSION,
            "wall_time_s": round(time.time() - t0, 3),
        }
        storage.put_atomic(storage.join(eroot, "summary.json"), json.dumps(summary, indent=2).encode(), opts)
        storage.put_atomic(storage.join(cfg.root, storage.RUNS, f"{run_id}.json"),
                           json.dumps({**summary, "config": _config_dict(cfg)}, indent=2).encode(), opts)
    finally:
        storage.release_lock(cfg.root, run_id, opts)
    return summary


def _run_graph(cfg: ReembedConfig, todo: list[dict], name: str, run_id: str, opts: dict) -> list[dict]:
    import ray

    from workers.pipeline import plan_actor_pool

    actors, gpus = _resources(cfg)
    read_cpus = 0.5
    threads, write_cpus = plan_actor_pool(actors, cfg.cpus_per_actor, gpus, read_cpus, cfg.torch_threads)
    actor_cfg = EmbedActorConfig(embedder=cfg.embedder, device=cfg.device, batch_size=cfg.batch_size,
                                 precision=cfg.precision, run_id=run_id, torch_threads=threads)
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.map(read_crops, fn_kwargs={"root": cfg.root, "storage_options": opts}, num_cpus=read_cpus)
    ds = ds.map_batches(EmbedActor, fn_constructor_kwargs={"config": actor_cfg}, batch_size=cfg.shards_per_call,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=gpus or None, num_cpus=cfg.cpus_per_actor)  # Ray Data restarts dead actors
    ds = ds.map(write_embeddings, fn_kwargs={"root": cfg.root, "name": name, "embedder_source": cfg.embedder,
                                             "storage_options": opts}, num_cpus=write_cpus)
    return list(ds.iter_rows())


def run_incremental(cfg, log=print) -> dict:
    """Process only the new or changed files of ``cfg.input`` into ``cfg.output`` (prepare's own skip).

    Args:
        cfg: a :class:`workers.pipeline.PrepareConfig`.

    Returns:
        prepare's summary plus ``mode`` "incremental" and ``nothing_to_do`` (no file was new or changed).
    """
    from workers.pipeline import run_prepare

    summary = run_prepare(cfg, log=log)
    summary = {**summary, "mode": "incremental", "nothing_to_do": summary["images_in"] == 0}
    if summary["nothing_to_do"]:
        log(f"facemill reprocess {summary['run_id']}: nothing to do ({summary['images_listed']} images listed, "
            f"all already processed and unchanged)")
    return summary


def _config_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
