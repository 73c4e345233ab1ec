"""The prepare graph on Ray Data: list -> shard -> decode (CPU tasks) -> faces (actor pool) -> commit (CPU tasks).

What to do comes from the dataset's current rows (:func:`files_to_do`): a file is done when its image row
has the same input fingerprint and was made with the same settings, unless it recorded a transient error
(``schemas.TRANSIENT_ERRORS``) or the run asks to retry errors. The files to do are sorted by uri and cut
into shards of ``shard_size``; each shard commits in one Delta transaction (:mod:`workers.dataset`), so a
killed run leaves whole shards or nothing, and the rerun does exactly the rest. Nothing but one small
summary row per shard ever comes back to the driver.

Ray Data fuses decode into the face actor when their resource requests are equal (CPU-only runs, where
it saves a copy); with GPUs the actor asks for ``num_gpus`` and decode runs in separate CPU tasks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import time
import uuid
from collections import Counter

import numpy as np
import pandas as pd

import schemas as S
from workers import dataset, inputs, storage
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
        run_id: recorded in every row ("" = generated): letters, digits, ``.``, ``_``, ``-``.
        torch_threads: intra-op threads per actor (0: see :func:`actor_threads`).
        retry_errors: reprocess every error row, not only transient ones (``schemas.TRANSIENT_ERRORS``).
        shared_fs: local --input/--output paths are on a filesystem every Ray node sees (a shared mount).
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
    torch_threads: int = 0
    retry_errors: bool = False
    shared_fs: bool = False

    def __post_init__(self):
        check_pool_settings(self.actors, self.gpus_per_actor, self.cpus_per_actor, self.torch_threads,
                            self.shards_per_call, self.device)
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 1 <= self.crop_quality <= 100:
            raise ValueError(f"crop_quality must be in [1, 100], got {self.crop_quality}")
        check_run_id(self.run_id)
        from workers.faces.embedders import check_precision

        check_precision(self.engine.embed_precision, None if self.device == "auto" else self.device)


def check_pool_settings(actors: int, gpus_per_actor: float, cpus_per_actor: float, torch_threads: int,
                        shards_per_call: int, device: str) -> None:
    """Validate the actor-pool settings shared by every stage.

    Raises:
        ValueError: naming the first bad value.
    """
    if actors < 0:
        raise ValueError(f"actors must be >= 0 (0: one per GPU, or 1 on CPU), got {actors}")
    if not 0 < gpus_per_actor <= 8:
        raise ValueError(f"gpus_per_actor must be in (0, 8], got {gpus_per_actor}")
    if not 0 < cpus_per_actor <= 256:
        raise ValueError(f"cpus_per_actor must be in (0, 256], got {cpus_per_actor}")
    if torch_threads < 0:
        raise ValueError(f"torch_threads must be >= 0 (0: automatic), got {torch_threads}")
    if shards_per_call < 1:
        raise ValueError(f"shards_per_call must be >= 1, got {shards_per_call}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


def check_run_id(run_id: str) -> None:
    """Run ids name files under ``<root>/_runs/``: one plain name, never a path.

    Raises:
        ValueError: the id holds anything but letters, digits, ``.``, ``_``, ``-`` (or is too long).
    """
    if run_id and not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id must be 1-80 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                         f"got {run_id!r}")


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def settings_digest(cfg: "PrepareConfig", embedder_name: str, embedder_version: str) -> str:
    """Digest of everything that shapes a prepare row: detection, alignment, embedding precision, decode
    limits, crop quality and the embedder (name and version). A rerun with other settings redoes the rows
    made with the old ones."""
    shaping = {"engine": dataclasses.asdict(cfg.engine), "decode": dataclasses.asdict(cfg.decode),
               "crop_quality": cfg.crop_quality, "embedder": [embedder_name, embedder_version],
               "schema": S.SCHEMA_VERSION}
    return hashlib.sha1(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_shards(todo: pd.DataFrame, shard_size: int, salt: str = "") -> list[dict]:
    """Cut the sorted files to do into shard rows, keyed by a digest of their uris, fingerprints and
    ``salt`` (the run id and settings: a shard key is never reused by another run)."""
    todo = todo.sort_values(S.URI, ignore_index=True)
    shards = []
    for start in range(0, len(todo), shard_size):
        part = todo.iloc[start:start + shard_size]
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


def actor_resources(actors: int, gpus_per_actor: float, device: str) -> tuple[int, float]:
    """(actors, GPUs per actor) on the connected cluster: one actor per GPU share where it has GPUs and the
    device allows them, else ``actors`` (default 1) CPU actors."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
    if gpus:
        return actors or max(1, int(gpus // gpus_per_actor)), gpus_per_actor
    return actors or 1, 0.0


def check_cluster(paths: list[str], device: str, precision: str, shared_fs: bool) -> None:
    """What only the connected Ray cluster can tell, checked before any work.

    Raises:
        ValueError: ``--device cuda`` or float16 on a cluster without GPUs; local paths on a cluster of
            several nodes (the other nodes would not see them) without ``shared_fs``.
    """
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and not gpus:
        raise ValueError("--device cuda, but the Ray cluster has no GPU; use --device auto or cpu")
    if precision == "float16" and (device == "cpu" or not gpus):
        raise ValueError("--embed-precision float16 needs CUDA and the Ray cluster has no GPU; use float32 "
                         "or bfloat16")
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    local = [p for p in paths if p and not storage.is_remote(p)]
    if nodes > 1 and local and not shared_fs:
        raise ValueError(f"the Ray cluster has {nodes} nodes, but {local[0]!r} is a local path the other nodes "
                         f"may not see; use s3:// (or a shared mount, and pass --shared-fs)")


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
    from workers.faces.embedders import load_embedder

    opts = dict(cfg.storage_options)
    spec = load_embedder(cfg.embedder).spec
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
        check_cluster([cfg.input, cfg.output], cfg.device, cfg.engine.embed_precision, cfg.shared_fs)
        dataset.create_dataset(cfg.output, checked.embedding_dim, opts)
        settings = settings_digest(cfg, checked.embedder_name, checked.embedder_version)
        done = dataset.read_table(cfg.output, S.IMAGES, opts,
                                  columns=[S.URI, S.FINGERPRINT, S.SETTINGS, S.STATUS, S.ERROR])
        listed = checked.inputs
        todo = files_to_do(listed, done.to_pandas(), settings, cfg.retry_errors)
        shards = plan_shards(todo, cfg.shard_size, salt=f"{run_id}|{settings}")
        log(f"facemill prepare {run_id}: {len(listed)} images listed, {len(listed) - len(todo)} already done, "
            f"{len(todo)} to do in {len(shards)} shards")
        rows = _run_graph(cfg, shards, settings, opts, log, lease) if shards else []
        lease.check()
        version = dataset.table_version(dataset.records_uri(cfg.output), opts)
        summary = _summarise(cfg, run_id, rows, len(listed), len(listed) - len(todo), checked.skipped, t0)
        summary.update(settings=settings, table_version=version, nothing_to_do=not shards)
        record = {**summary, "config": _config_dict(cfg)}
        storage.write_json(storage.join(cfg.output, storage.RUNS, f"{run_id}.json"), record, opts)
        if shards:  # a run that did nothing leaves the last real run's summary and report in place
            storage.write_json(storage.join(cfg.output, "summary.json"), summary, opts)
            write_prepare_report(cfg.output, summary, rows, opts)  # never raises: a report is not worth a run
            dataset.vacuum(dataset.records_uri(cfg.output), opts)
    finally:
        if own:
            lease.release()
    return summary


def _run_graph(cfg: PrepareConfig, shards: list[dict], settings: str, opts: dict, log, lease) -> list[dict]:
    import ray

    actors, gpus = actor_resources(cfg.actors, cfg.gpus_per_actor, cfg.device)
    fused = not gpus and cfg.cpus_per_actor == 1  # decode then runs inside the actors
    threads, write_cpus = plan_actor_pool(actors, cfg.cpus_per_actor, gpus, 0.0 if fused else 1.0,
                                          cfg.torch_threads)
    actor_cfg = ActorConfig(engine=cfg.engine, embedder=cfg.embedder, device=cfg.device, run_id=cfg.run_id,
                            settings=settings, torch_threads=threads)
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


def _config_dict(cfg: PrepareConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


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
