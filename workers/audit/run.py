"""run_audit: the audit of one prepared dataset, driven from here, its heavy parts on Ray.

    pass 1 (CPU task per faces shard, :mod:`workers.audit.scan`): decode crops -> sharpness, thumbnails
    driver: unit embeddings, identity codes, robust identity centres (segment sums)
    pass 2 (the shard-graph runner, :mod:`workers.audit.search`): kNN of every face, nearest other centre
    driver: the findings (:mod:`workers.audit.findings`) -> one Delta table each -> summary.json, report.html

Every check that can fail does so before pass 1, with one line. The dataset's records version is read
before and after: an audit of a dataset that changed meanwhile is refused rather than written.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa

import schemas as S
from workers import dataset, delta, records, storage
from workers.audit import against as against_
from workers.audit import findings
from workers.audit.config import AuditConfig
from workers.audit.groups import normalise, robust_centres
from workers.audit.knn import Index, neighbours
from workers.audit.scan import THUMBNAIL, scan_shard
from workers.audit.search import (SearchActor, SearchActorConfig, chunk_rows, nearest_other_identity,
                                  plan_chunk, unpack_results)
from workers.audit.store import REPORT, SUMMARY, write_audit_table
from workers.graph import Stage, plan_pool, run_shard_graph
from workers.runs import config_dict, new_run_id
from workers.storage import StorageError

A = S.audit
SCAN_CPUS = 1.0
EMBEDDING_KEYS = [S.IMAGE_ID, S.FACE_INDEX, S.SHARD]


def _records_version(root: str, opts: dict) -> int | None:
    return delta.table_version(dataset.records_uri(root), opts)


def check_inputs(cfg: AuditConfig, opts: dict) -> dict:
    """Everything checkable before any work; returns what the run needs (shards, embeddings, eval keys).

    Raises:
        StorageError: no dataset, or the output is not writable.
        ValueError: no faces, an unknown or non-matching embeddings table, a bad pairs file.
    """
    dataset.require_dataset(cfg.root, opts)
    shards = dataset.face_shards(cfg.root, opts)
    if shards.empty:
        raise ValueError(f"{cfg.root!r} holds no faces: run prepare first")
    out = {"shards": list(shards.index), "embeddings": None, "eval_keys": None, "eval_root": None}
    if cfg.embeddings:
        names = dataset.list_embeddings(cfg.root, opts)
        if cfg.embeddings not in names:
            raise ValueError(f"{cfg.root!r} has no embeddings table {cfg.embeddings!r} "
                             f"(it has: {', '.join(names) or 'none'}); make it with jobs.reprocess")
        out["embeddings"] = dataset.read_table(cfg.root, f"{S.EMBEDDINGS}/{cfg.embeddings}", opts,
                                               columns=EMBEDDING_KEYS + [S.EMBEDDING])
        faces = dataset.read_table(cfg.root, S.FACES, opts, columns=EMBEDDING_KEYS)
        missing = int((_match(faces, out["embeddings"]) < 0).sum())
        if missing:
            raise ValueError(f"embeddings table {cfg.embeddings!r} does not match the faces: {missing} of "
                             f"{len(faces)} current faces have no vector in it; re-embed with jobs.reprocess")
    if cfg.against:
        if dataset.read_marker(cfg.against, opts):           # a prepared dataset: all its faces
            out["eval_root"] = cfg.against
        else:                                               # an LFW-style pairs file
            out["eval_keys"] = against_.pair_keys(_read_text(cfg.against, opts))
            out["eval_names"] = {k.split("/", 1)[0] for k in out["eval_keys"]}
            out["eval_root"] = cfg.against_dataset or cfg.root
        if out["eval_root"] != cfg.root:
            dataset.require_dataset(out["eval_root"], opts)
    storage.check_writable(cfg.output, opts)
    return out


def _read_text(uri: str, opts: dict) -> str:
    """A pairs file's text (local or remote), with a final newline.

    Raises:
        ValueError: it does not exist, or is not a file or a dataset.
    """
    fs, path = storage.url_to_fs(uri, opts)
    if not fs.isfile(path):
        raise ValueError(f"--against {uri!r} is neither a pairs file nor a prepared dataset")
    return fs.cat_file(path).decode("utf-8", errors="replace") + "\n"


def _match(faces: pa.Table, table: pa.Table) -> np.ndarray:
    """int64[len(faces)]: row of each face's (image_id, face_index, shard) in ``table`` (-1: none)."""
    have = pd.MultiIndex.from_arrays([table.column(k).to_numpy(zero_copy_only=False) for k in EMBEDDING_KEYS])
    want = pd.MultiIndex.from_arrays([faces.column(k).to_numpy(zero_copy_only=False) for k in EMBEDDING_KEYS])
    return np.asarray(have.get_indexer(want), np.int64)


def scan(root: str, shards: list[str], all_faces: bool, with_embedding: bool, opts: dict) -> pa.Table:
    """Pass 1: :func:`scan_shard` over every shard as Ray tasks (a bounded number in flight)."""
    import ray

    task = ray.remote(num_cpus=SCAN_CPUS, max_retries=3)(scan_shard)
    window = max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    pending, done, todo = [], [], list(shards)
    while todo or pending:
        while todo and len(pending) < window:
            pending.append(task.remote({"shard": todo.pop(0)}, root=root, all_faces=all_faces,
                                       with_embedding=with_embedding, storage_options=opts))
        ready, pending = ray.wait(pending, num_returns=1)
        done.extend(ray.get(ready))
    tables = [records.table_from_ipc(r["table_ipc"]) for r in sorted(done, key=lambda r: r["shard"])]
    return pa.concat_tables(tables).combine_chunks()


def _matrix(column: pa.ChunkedArray, width: int, dtype) -> np.ndarray:
    col = column.combine_chunks()
    flat = col.flatten().to_numpy() if pa.types.is_fixed_size_list(col.type) else \
        np.frombuffer(col.buffers()[1], np.uint8)[col.offset * width:(col.offset + len(col)) * width]
    return np.asarray(flat, dtype).reshape(len(col), width)


def search(cfg: AuditConfig, embeddings: np.ndarray, codes: np.ndarray, centres: np.ndarray | None) -> dict:
    """Pass 2 on the shard-graph runner: every face's neighbours and nearest other identity centre."""
    import dataclasses

    import ray

    # the read stage asks for what a CPU actor asks for, so Ray Data fuses it into the actors on a CPU-only
    # pool (a zero-CPU stage would start a worker process per chunk at once)
    feeding = cfg.pool.cpus_per_actor
    plan = plan_pool(cfg.pool, feeding_cpus=feeding, fused_on_cpu=True)
    settings = dataclasses.replace(cfg.search, device="cuda" if plan.gpus else "cpu",
                                   threads=cfg.search.threads or plan.threads)
    actor_cfg = SearchActorConfig(embeddings=ray.put(embeddings),
                                  centres=ray.put(centres) if centres is not None else None, settings=settings)
    items = chunk_rows(len(embeddings), cfg.chunk_size)
    commit = Stage(nearest_other_identity, {"codes": ray.put(codes)}, cpus=plan.write_cpus)
    rows = list(run_shard_graph(items, Stage(plan_chunk, {}, cpus=feeding), SearchActor, actor_cfg, cfg.pool, plan,
                                commit))
    return unpack_results(rows, len(embeddings), cfg.search.k)


def run_audit(cfg: AuditConfig, log=print) -> dict:
    """Audit ``cfg.root`` into ``cfg.output``; returns (and writes as summary.json) the run summary.

    Raises:
        StorageError, ValueError: see :func:`check_inputs`; the dataset changed during the audit.
    """
    from workers.audit.report import write_report
    from workers.lease import take_lease

    t0 = time.time()
    opts = dict(cfg.storage_options)
    run_id = cfg.run_id or new_run_id()
    checked = check_inputs(cfg, opts)
    lease = take_lease(cfg.output, run_id, "audit", opts)
    times = {}
    try:
        version = _records_version(cfg.root, opts)
        log(f"facemill audit {run_id}: {cfg.root} ({len(checked['shards'])} shards) -> {cfg.output}")
        faces = scan(cfg.root, checked["shards"], cfg.all_faces, checked["embeddings"] is None, opts)
        if checked["embeddings"] is not None:
            emb = checked["embeddings"]
            rows = _match(faces, emb)
            faces = faces.append_column(S.EMBEDDING, emb.column(S.EMBEDDING).take(pa.array(rows)))
        times["scan_s"] = time.time() - t0
        dim = faces.schema.field(S.EMBEDDING).type.list_size
        embeddings = normalise(_matrix(faces.column(S.EMBEDDING), dim, np.float32))
        thumbs = _matrix(faces.column(THUMBNAIL), faces.schema.field(THUMBNAIL).type.byte_width, np.uint8)
        faces = faces.drop_columns([S.EMBEDDING, THUMBNAIL])
        ident = faces.column(S.IDENTITY).to_pandas()
        codes, names = pd.factorize(ident, use_na_sentinel=True)
        codes, names = codes.astype(np.int64), np.asarray(names, dtype=object)
        labelled = len(names) > 0
        t = time.time()
        if labelled:
            centres, own, _, _ = robust_centres(embeddings, codes, len(names), cfg.labels.keep_cosine)
        else:
            centres, own = None, np.full(len(codes), np.nan, np.float32)
        times["centres_s"] = time.time() - t
        t = time.time()
        found = search(cfg, embeddings, codes, centres)
        times["search_s"] = time.time() - t
        t = time.time()
        tables = {A.AUDIT_QUALITY: findings.quality_table(faces, cfg.quality, run_id)}
        if labelled:
            tables[A.AUDIT_LABELS] = findings.labels_table(faces, own, found["other_code"], found["other_cosine"],
                                                           names, codes, cfg.labels, run_id)
            tables[A.AUDIT_IDENTITIES] = findings.identities_table(embeddings, codes, centres, names, cfg.labels,
                                                                   run_id)
        pairs = findings.duplicate_pairs(found["faces_sims"], found["faces_rows"], thumbs, cfg.duplicates)
        evaluation, leaks, overlap = _leaks(cfg, checked, faces, embeddings, thumbs, opts)
        tables[A.AUDIT_DUPLICATES] = findings.duplicates_table(faces, pairs, run_id, evaluation, leaks)
        times["findings_s"] = time.time() - t
        if cfg.cluster:
            t = time.time()
            tables[A.AUDIT_CLUSTERS] = findings.clusters_table(faces, embeddings, found["faces_sims"],
                                                               found["faces_rows"], cfg.clusters, run_id)
            times["cluster_s"] = time.time() - t
        if _records_version(cfg.root, opts) != version:
            raise StorageError(f"{cfg.root!r} changed during the audit (records version {version} -> "
                               f"{_records_version(cfg.root, opts)}); run the audit again")
        lease.check()
        versions = {name: write_audit_table(cfg.output, name, table, opts) for name, table in tables.items()}
        summary = _summary(cfg, run_id, faces, names, tables, versions, version, overlap, times, t0)
        write_report(cfg, summary, tables, opts)
        storage.write_json(storage.join(cfg.output, SUMMARY), summary, opts)
        storage.write_json(storage.join(cfg.output, storage.RUNS, f"{run_id}.json"),
                           {**summary, "config": config_dict(cfg)}, opts)
    finally:
        lease.release()
    log(f"facemill audit {run_id}: " + ", ".join(f"{k} {v}" for k, v in summary["flagged"].items())
        + f" flagged of {summary['faces']} faces in {summary['wall_time_s']:.0f} s")
    return summary


def _leaks(cfg: AuditConfig, checked: dict, faces: pa.Table, embeddings: np.ndarray, thumbs: np.ndarray,
           opts: dict) -> tuple[pa.Table | None, pd.DataFrame | None, dict | None]:
    """(evaluation faces table, leak pairs, identity overlap) for ``--against`` (Nones without it)."""
    if checked["eval_root"] is None:
        return None, None, None
    uris = faces.column(S.URI).to_pylist()
    if checked["eval_root"] == cfg.root:
        rows = against_.eval_rows(uris, checked["eval_keys"])
        evaluation, e_emb, e_thumbs = faces.take(pa.array(rows)), embeddings[rows], thumbs[rows]
        skip = np.zeros(len(uris), bool)
        skip[rows] = True
    else:
        other = scan(checked["eval_root"], list(dataset.face_shards(checked["eval_root"], opts).index),
                     cfg.all_faces, True, opts)
        rows = against_.eval_rows(other.column(S.URI).to_pylist(), checked["eval_keys"])
        other = other.take(pa.array(rows))
        dim = other.schema.field(S.EMBEDDING).type.list_size
        e_emb = normalise(_matrix(other.column(S.EMBEDDING), dim, np.float32))
        e_thumbs = _matrix(other.column(THUMBNAIL), other.schema.field(THUMBNAIL).type.byte_width, np.uint8)
        evaluation = other.drop_columns([S.EMBEDDING, THUMBNAIL])
        skip = pd.Index(faces.column(S.IMAGE_ID).to_pylist()).isin(evaluation.column(S.IMAGE_ID).to_pylist())
        rows = np.flatnonzero(skip)
    if not len(e_emb):
        raise ValueError(f"none of the evaluation images of {cfg.against!r} is among the faces of "
                         f"{checked['eval_root']!r}")
    sims, found = neighbours(Index(embeddings, cfg.search), e_emb, np.full(len(e_emb), -1, np.int64), cfg.search.k)
    leaks = against_.leak_pairs(sims, found, e_thumbs, thumbs, np.asarray(skip, bool), cfg.duplicates)
    overlap = None
    if checked["eval_keys"] is not None:
        overlap = against_.identity_overlap(faces.column(S.IDENTITY), checked["eval_names"], rows)
    return evaluation, leaks, overlap


def _summary(cfg, run_id, faces, names, tables, versions, version, overlap, times, t0) -> dict:
    flagged = {name: int(pa.compute.sum(t.column(A.FLAGGED)).as_py() or 0)
               for name, t in tables.items() if A.FLAGGED in t.column_names}
    dups = tables[A.AUDIT_DUPLICATES]
    kinds = dups.filter(dups.column(A.FLAGGED)).column(A.KIND).to_pandas().value_counts().to_dict() \
        if dups.num_rows else {}
    summary = {
        "run_id": run_id, "root": cfg.root, "output": cfg.output, "embeddings": cfg.embeddings or S.FACES,
        "records_version": version, "faces": faces.num_rows, "identities": len(names),
        "flagged": flagged, "duplicates_by_kind": {k: int(v) for k, v in kinds.items()},
        "tables": versions, "audit_version": A.AUDIT_VERSION,
        "times_s": {k: round(v, 3) for k, v in times.items()}, "wall_time_s": round(time.time() - t0, 3),
    }
    if A.AUDIT_CLUSTERS in tables:
        summary["clusters"] = int(pa.compute.max(tables[A.AUDIT_CLUSTERS].column(A.CLUSTER)).as_py() + 1)
    if overlap is not None:
        summary["against_identity_overlap"] = overlap
    return summary
