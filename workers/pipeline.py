"""The prepare graph on Ray Data: list -> shard -> decode (CPU tasks) -> faces (actor pool) -> commit (CPU tasks).

Shards are deterministic: the files still to do (not yet committed, or changed since) are sorted by uri and
cut into groups of ``shard_size``; a shard's key is a digest of its members, so rerunning the same command
recomputes exactly the shards that did not commit. Nothing but one small summary row per shard ever comes
back to the driver.

Ray Data fuses decode into the face actor when their resource requests are equal (CPU-only runs, where
it saves a copy); with GPUs the actor asks for ``num_gpus`` and decode runs in separate CPU tasks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
import uuid
from collections import Counter

import numpy as np
import pandas as pd

import schemas as S
from workers import storage
from workers.actors import ActorConfig, FaceActor, decode_shard, write_shard
from workers.decode import DecodeConfig
from workers.faces.engine import EngineConfig
from workers.report import write_prepare_report


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Everything one prepare run needs.

    Attributes:
        input: folder, manifest (.csv/.parquet) or s3:// URI of the images.
        output: dataset root (local or s3://).
        embedder: registry name (``sface``) or an exported embedder directory.
        engine: detection / alignment settings.
        decode: decode limits.
        shard_size: images per output shard (and per decode task).
        shards_per_call: shards handed to one face actor call.
        actors: face actors (0: one per GPU, or 1 without GPUs).
        gpus_per_actor: GPU share of each actor when the cluster has GPUs (fractions allowed).
        cpus_per_actor: CPUs reserved by each actor.
        device: "auto", "cuda" or "cpu" for the actors.
        crop_quality: JPEG quality of stored crops.
        storage_options: fsspec options for input and output (e.g. endpoint_url).
        run_id: recorded in every row ("" = generated).
        force_unlock: take the output's lock even if another run seems to hold it.
        torch_threads: intra-op threads per actor (0: see :func:`actor_threads`).
    """

    input: str
    output: str
    embedder: str = "sface"
    engine: EngineConfig = EngineConfig()
    decode: DecodeConfig = DecodeConfig()
    shard_size: int = 256
    shards_per_call: int = 2
    actors: int = 0
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    device: str = "auto"
    crop_quality: int = 95
    storage_options: tuple[tuple[str, str], ...] = ()
    run_id: str = ""
    force_unlock: bool = False
    torch_threads: int = 0

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.shards_per_call < 1:
            raise ValueError(f"shards_per_call must be >= 1, got {self.shards_per_call}")
        if not 0 < self.gpus_per_actor <= 8:
            raise ValueError(f"gpus_per_actor must be in (0, 8], got {self.gpus_per_actor}")


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def plan_shards(todo: pd.DataFrame, shard_size: int) -> list[dict]:
    """Cut the sorted files to do into shard rows keyed by a digest of their uris and fingerprints."""
    todo = todo.sort_values(S.URI, ignore_index=True)
    shards = []
    for start in range(0, len(todo), shard_size):
        part = todo.iloc[start:start + shard_size]
        members = [f"{u}|{'' if pd.isna(f) else f}" for u, f in zip(part[S.URI], part[S.FINGERPRINT])]
        key = hashlib.sha1("\n".join(members).encode()).hexdigest()[:20]
        shards.append({
            "shard": f"part-{key}", "uris": part[S.URI].tolist(),
            "identities": [None if pd.isna(v) else str(v) for v in part[S.IDENTITY]],
            "fingerprints": [None if pd.isna(v) else str(v) for v in part[S.FINGERPRINT]],
        })
    return shards


def files_to_do(inputs: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
    """Inputs not yet in the output, or whose fingerprint changed since they were processed."""
    if done.empty:
        return inputs
    merged = inputs.merge(done[[S.URI, S.FINGERPRINT]].rename(columns={S.FINGERPRINT: "_old"}), on=S.URI,
                          how="left", indicator=True)
    new = merged["_merge"] == "left_only"
    changed = (~new) & merged[S.FINGERPRINT].notna() & merged["_old"].notna() & (
        merged[S.FINGERPRINT] != merged["_old"])
    return inputs[(new | changed).to_numpy()].reset_index(drop=True)


def _face_resources(cfg: PrepareConfig) -> tuple[int, float]:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if cfg.device != "cpu" else 0
    if gpus:
        actors = cfg.actors or max(1, int(gpus // cfg.gpus_per_actor))
        return actors, cfg.gpus_per_actor
    return cfg.actors or 1, 0.0


def alive_node_cpus() -> list[float]:
    """CPUs of each alive node of the connected Ray cluster."""
    import ray

    return [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]


def actor_threads(requested: int, cpus_per_actor: float, gpus_per_actor: float, actors: int,
                  node_cpus: list[float]) -> int:
    """Torch intra-op threads of each face actor.

    ``requested`` when set. Otherwise the actor's reserved CPUs, except on a single CPU-only node (a
    laptop, the embedded local Ray), where the actors share all of the node's cores: one actor on
    2 cores ran the LFW prepare at 29.4 img/s with 2 threads against 21.5 with 1 (docs/performance.md).
    """
    if requested:
        return requested
    own = max(1, int(cpus_per_actor))
    if gpus_per_actor or len(node_cpus) != 1:
        return own
    return max(own, int(node_cpus[0] // max(1, actors)))


def check_cpu_headroom(actors: int, cpus_per_actor: float, task_cpus: float, cluster_cpus: float) -> None:
    """Refuse an actor pool that would leave too few CPUs for the read/decode tasks that feed it: Ray
    would wait for them forever.

    Ray Data fuses decode into the face actor only when both ask for the same resources (CPU-only runs
    with one CPU per actor; then ``task_cpus`` is 0); otherwise decode runs as separate tasks beside them.

    Args:
        actors: actors in the pool.
        cpus_per_actor: CPUs each reserves.
        task_cpus: CPUs one feeding task needs.
        cluster_cpus: CPUs of the cluster now.

    Raises:
        ValueError: the actors leave less than ``task_cpus`` free.
    """
    reserved = actors * cpus_per_actor
    if task_cpus and reserved > cluster_cpus - task_cpus:
        raise ValueError(f"{actors} actor(s) x {cpus_per_actor:g} CPUs reserve {reserved:g} of the cluster's "
                         f"{cluster_cpus:g} CPUs, leaving less than the {task_cpus:g} its read/decode tasks need; "
                         f"lower --actors or --cpus-per-actor")


WRITE_TASK_CPUS = 0.5


def write_task_cpus(reserved: float, feeding_cpus: float, cluster_cpus: float) -> float:
    """CPUs each write task asks for: ``WRITE_TASK_CPUS``, or what the actors and one feeding task leave
    free, down to 0.

    A write task that cannot be scheduled while the actors live stops the stream: every result then
    waits in the object store until the last actor exits (seen: ``--actors 2`` on 2 CPUs wrote nothing
    for 60 s, then all 16 shards at once). Writes are light (JPEG-encode the crops, one Parquet file
    per shard), so running them beside the actors without a reservation costs little.

    Args:
        reserved: CPUs the actor pool reserves.
        feeding_cpus: CPUs one read/decode task needs (0 when decode is fused into the actors).
        cluster_cpus: CPUs of the cluster now.
    """
    return max(0.0, min(WRITE_TASK_CPUS, cluster_cpus - reserved - feeding_cpus))


def plan_actor_pool(actors: int, cpus_per_actor: float, gpus_per_actor: float, feeding_cpus: float,
                    torch_threads: int) -> tuple[int, float]:
    """Check an actor pool against the connected Ray cluster before any work (:func:`check_cpu_headroom`).

    Returns:
        (torch threads per actor (:func:`actor_threads`), CPUs per write task (:func:`write_task_cpus`)).
    """
    import ray

    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    check_cpu_headroom(actors, cpus_per_actor, feeding_cpus, cluster_cpus)
    threads = actor_threads(torch_threads, cpus_per_actor, gpus_per_actor, actors, alive_node_cpus())
    return threads, write_task_cpus(actors * cpus_per_actor, feeding_cpus, cluster_cpus)


def check_prepare(cfg: PrepareConfig) -> tuple[pd.DataFrame, list[str]]:
    """Everything that can fail before any work: the embedder, the input listing, the output's writability.

    Returns:
        (inputs, skipped) from :func:`workers.storage.list_inputs`.

    Raises:
        storage.StorageError: input missing/empty, output not writable.
        ValueError: unknown embedder.
        WeightsNotFound: a registry model's package is missing.
    """
    from workers.faces.embedders import load_embedder

    opts = dict(cfg.storage_options)
    load_embedder(cfg.embedder)
    inputs, skipped = storage.list_inputs(cfg.input, opts)
    storage.check_writable(cfg.output, opts)
    return inputs, skipped


def run_prepare(cfg: PrepareConfig, log=print, checked: tuple[pd.DataFrame, list[str]] | None = None) -> dict:
    """Run prepare on the connected Ray cluster; returns (and writes) the run summary.

    Args:
        cfg: the run.
        log: progress lines go here.
        checked: the result of :func:`check_prepare`, if the caller already ran it.

    Raises:
        storage.StorageError: input missing/empty, output not writable, output locked.
        ValueError: unknown embedder.
    """
    t0 = time.time()
    opts = dict(cfg.storage_options)
    run_id = cfg.run_id or new_run_id()
    inputs, skipped = checked if checked is not None else check_prepare(cfg)
    storage.acquire_lock(cfg.output, run_id, opts, force=cfg.force_unlock)
    try:
        markers = storage.committed(cfg.output, opts)
        removed = storage.remove_uncommitted(cfg.output, [S.IMAGES, S.FACES], markers, opts)
        done = storage.read_table(cfg.output, S.IMAGES, opts, columns=[S.URI, S.FINGERPRINT], markers=markers)
        todo = files_to_do(inputs, done.to_pandas())
        shards = plan_shards(todo, cfg.shard_size)
        log(f"facemill prepare {run_id}: {len(inputs)} images listed, {len(inputs) - len(todo)} already done, "
            f"{len(todo)} to do in {len(shards)} shards" + (f"; removed {removed} partial files" if removed else ""))
        if not shards:
            log(f"facemill prepare {run_id}: nothing to do, all {len(inputs)} images are already in {cfg.output}")
        rows = _run_graph(cfg, shards, run_id, opts, log) if shards else []
        summary = _summarise(cfg, run_id, rows, len(inputs), len(inputs) - len(todo), skipped, t0)
        storage.put_atomic(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=2).encode(), opts)
        storage.put_atomic(storage.join(cfg.output, storage.RUNS, f"{run_id}.json"),
                           json.dumps({**summary, "config": _config_dict(cfg)}, indent=2).encode(), opts)
        write_prepare_report(cfg.output, summary, rows, opts)  # never raises: a report is not worth a run
    finally:
        storage.release_lock(cfg.output, run_id, opts)
    return summary


def _run_graph(cfg: PrepareConfig, shards: list[dict], run_id: str, opts: dict, log) -> list[dict]:
    import ray

    actors, gpus = _face_resources(cfg)
    fused = not gpus and cfg.cpus_per_actor == 1  # decode then runs inside the actors
    threads, write_cpus = plan_actor_pool(actors, cfg.cpus_per_actor, gpus, 0.0 if fused else 1.0,
                                          cfg.torch_threads)
    actor_cfg = ActorConfig(engine=cfg.engine, embedder=cfg.embedder, device=cfg.device, run_id=run_id,
                            torch_threads=threads)
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))
    ds = ds.map(decode_shard, fn_kwargs={"storage_options": opts, "decode": cfg.decode}, num_cpus=1)
    ds = ds.map_batches(FaceActor, fn_constructor_kwargs={"config": actor_cfg}, batch_size=cfg.shards_per_call,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=gpus or None, num_cpus=cfg.cpus_per_actor)  # Ray Data restarts dead actors
    ds = ds.map(write_shard, fn_kwargs={"output": cfg.output, "storage_options": opts,
                                        "crop_size": cfg.engine.align.size, "crop_quality": cfg.crop_quality},
                num_cpus=write_cpus)
    rows, n_img, t0, last = [], 0, time.time(), 0.0
    total = sum(len(s["uris"]) for s in shards)
    for row in ds.iter_rows():
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
        "shards": len(rows), "skipped_non_image_files": len(skipped), "skipped_examples": skipped[:5],
        "median_face_size_px": float(np.median(sizes)) if sizes.size else None,
        "wall_time_s": round(wall, 3), "images_per_s": round(n / wall, 2) if wall > 0 else None,
    }


def _config_dict(cfg: PrepareConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def print_summary(summary: dict, out=sys.stdout) -> None:
    """Human-readable summary lines."""
    s = summary
    print(f"facemill prepare {s['run_id']}: {s['images_in']} images in "
          f"({s['images_already_done']} already done), {s['images_with_faces']} with faces, "
          f"{s['images_no_face']} no face, {s['images_error']} errors"
          f"{' ' + json.dumps(s['errors_by_reason']) if s['errors_by_reason'] else ''}, "
          f"{s['faces']} faces; {s['wall_time_s']:.1f} s, {s['images_per_s'] or 0:.1f} img/s", file=out)
    print(f"output: {s['output']} (summary.json, report.html)", file=out)
