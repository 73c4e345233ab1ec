"""Pass 2 of an audit on the shard-graph runner (:func:`workers.graph.run_shard_graph`): neighbours.

    chunk rows (start, stop) -> SearchActor (holds the faces index and the identity-centres index;
    exact on a GPU) -> nearest_other_identity (CPU task) -> one summary row per chunk back to the driver

The embeddings and the centres travel once through the object store (their refs are in the actor's
config); each chunk row returns its faces' k nearest faces and their nearest other identity centre.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

from workers import records
from workers.audit.knn import Index, SearchSettings, neighbours
from workers.audit.labels import nearest_other

CENTRES_EXACT_MAX = 20_000   # more identities than this: an IVF index over the centres too
CENTRE_K = 3   # nearest centres searched per face: its own identity's is among them at most once


@dataclasses.dataclass(frozen=True)
class SearchActorConfig:
    """What a search actor loads.

    Attributes:
        embeddings: object ref of float32[N, D] unit face embeddings (the base and the queries).
        centres: object ref of float32[G, D] identity centres (None: no identities).
        settings: search settings (``device`` as planned for the actor).
    """

    embeddings: Any
    centres: Any
    settings: SearchSettings


def chunk_rows(total: int, size: int) -> list[dict]:
    """Rows {chunk, start, stop} cutting 0..total into chunks of ``size``."""
    return [{"chunk": i, "start": s, "stop": min(total, s + size)} for i, s in enumerate(range(0, total, size))]


def plan_chunk(row: dict) -> dict:
    """Read stage of the search graph: the chunk's bounds as they are (the actor holds the vectors)."""
    return {"chunk": int(row["chunk"]), "start": int(row["start"]), "stop": int(row["stop"])}


def _neighbours_table(sims: np.ndarray, rows: np.ndarray, prefix: str) -> dict:
    k = sims.shape[1]
    return {f"{prefix}_sims": pa.FixedSizeListArray.from_arrays(pa.array(sims.ravel(), pa.float32()), k),
            f"{prefix}_rows": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel(), pa.int64()), k)}


class SearchActor:
    """Ray Data callable class: builds both indexes once, then answers chunks of queries."""

    def __init__(self, config: SearchActorConfig):
        import ray

        self.embeddings = ray.get(config.embeddings)
        self.settings = config.settings
        self.faces = Index(self.embeddings, config.settings)
        centres = ray.get(config.centres) if config.centres is not None else None
        self.centres = Index(centres, dataclasses.replace(config.settings, exact_max=min(
            config.settings.exact_max, CENTRES_EXACT_MAX))) if centres is not None and len(centres) else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Columns chunk, start, stop and result_ipc: per face of the chunk its ``k`` nearest other faces
        (faces_sims/faces_rows) and its ``CENTRE_K`` nearest identity centres (centres_sims/_rows)."""
        out = []
        for start, stop in zip(batch["start"], batch["stop"]):
            queries = self.embeddings[int(start):int(stop)]
            cols = _neighbours_table(*neighbours(self.faces, queries, np.arange(int(start), int(stop)),
                                                 self.settings.k), "faces")
            if self.centres is not None:
                cols.update(_neighbours_table(*self.centres.search(queries, min(CENTRE_K, self.centres.size)),
                                              "centres"))
            out.append(records.table_to_ipc(pa.table(cols)))
        return {"chunk": np.asarray(batch["chunk"]), "start": np.asarray(batch["start"]),
                "stop": np.asarray(batch["stop"]), "result_ipc": np.array(out, dtype=object)}


def nearest_other_identity(row: dict, *, codes: Any) -> dict:
    """Commit stage of the search graph: each face's nearest *other* identity centre, computed beside the
    actors so that only [N] columns of it return; the face neighbours pass on as they are.

    Args:
        row: the actor's output row.
        codes: object ref of int64[N] identity codes.
    """
    import ray

    table = records.table_from_ipc(row["result_ipc"])
    start, stop = int(row["start"]), int(row["stop"])
    if "centres_rows" in table.column_names:
        own = ray.get(codes)[start:stop]
        k = table.schema.field("centres_rows").type.list_size
        c_rows = table.column("centres_rows").combine_chunks().flatten().to_numpy().reshape(-1, k)
        c_sims = table.column("centres_sims").combine_chunks().flatten().to_numpy().reshape(-1, k)
        other, cosine = nearest_other(own, c_sims, c_rows)
        table = table.drop_columns(["centres_rows", "centres_sims"]).append_column(
            "other_code", pa.array(other, pa.int64())).append_column("other_cosine", pa.array(cosine, pa.float32()))
    return {"chunk": int(row["chunk"]), "start": start, "stop": stop, "result_ipc": records.table_to_ipc(table)}


def unpack_results(rows: list[dict], total: int, k: int) -> dict[str, np.ndarray]:
    """The chunks' results in face order: faces_sims float32[N, k], faces_rows int64[N, k] and, where
    identities were searched, other_code int64[N], other_cosine float32[N]."""
    rows = sorted(rows, key=lambda r: r["start"])
    tables = [records.table_from_ipc(r["result_ipc"]) for r in rows]
    got = sum(t.num_rows for t in tables)
    if got != total:
        raise RuntimeError(f"the search returned {got} of {total} faces")
    table = pa.concat_tables(tables)
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy().reshape(total, col.type.list_size)
        else:
            out[name] = col.to_numpy()
    if "faces_rows" not in out:
        out["faces_rows"], out["faces_sims"] = np.zeros((total, 0), np.int64), np.zeros((total, 0), np.float32)
    return out
