"""k nearest neighbours by cosine over unit embeddings: faiss on CPU, exact blocked matmul on a GPU.

On CPU: exact (``IndexFlatIP``) up to :data:`EXACT_MAX` vectors, else an inverted-file index
(``IndexIVFFlat``, inner product) with ``nlist ~ 2 sqrt(N)`` lists trained on a seeded sample of
``TRAIN_PER_LIST`` points per list and
``nprobe`` lists searched per query. On CUDA: exact search as ``queries @ base.T`` in blocks with
``torch.topk``, so a GPU node never approximates.
"""
from __future__ import annotations

import dataclasses

import numpy as np

EXACT_MAX = 100_000
TRAIN_PER_LIST = 32   # k-means training points per inverted list (faiss suggests >= 39; fewer trains faster)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How neighbours are searched.

    Attributes:
        k: neighbours per query (the query itself excluded where it is in the base).
        nprobe: inverted lists searched per query (approximate search only).
        exact_max: bases up to this size are searched exactly on CPU too.
        threads: faiss OpenMP threads (0: faiss's default).
        device: "cpu" or "cuda".
    """

    k: int = 10
    nprobe: int = 8
    exact_max: int = EXACT_MAX
    threads: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")


class Index:
    """A search index over ``base`` (float32[M, D] unit rows), built once, queried many times."""

    def __init__(self, base: np.ndarray, settings: SearchSettings = SearchSettings(), seed: int = 0):
        self.settings = settings
        self.size = len(base)
        if settings.device == "cuda":
            import torch

            self._base = torch.as_tensor(np.ascontiguousarray(base), device="cuda")
            return
        import faiss

        if settings.threads:
            faiss.omp_set_num_threads(settings.threads)
        base = np.ascontiguousarray(base, np.float32)
        dim = base.shape[1]
        if len(base) <= settings.exact_max:
            self._index = faiss.IndexFlatIP(dim)
        else:
            nlist = int(2 * np.sqrt(len(base)))
            quantizer = faiss.IndexFlatIP(dim)
            self._index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(seed).choice(len(base), size=min(len(base), TRAIN_PER_LIST * nlist), replace=False)
            self._index.train(base[np.sort(sample)])
            self._index.nprobe = settings.nprobe
            self._quantizer = quantizer  # the IVF index does not own it
        self._index.add(base)

    @property
    def exact(self) -> bool:
        return self.settings.device == "cuda" or self.size <= self.settings.exact_max

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines float32[Q, k] descending, base rows int64[Q, k]; -1 where fewer than k were found)."""
        k = int(min(k, self.size))
        if self.settings.device == "cuda":
            import torch

            sims, rows = [], []
            q = torch.as_tensor(np.ascontiguousarray(queries), device="cuda")
            for start in range(0, len(q), 8192):
                s, r = torch.topk(q[start:start + 8192] @ self._base.T, k, dim=1)
                sims.append(s.cpu().numpy())
                rows.append(r.cpu().numpy())
            return np.concatenate(sims), np.concatenate(rows).astype(np.int64)
        sims, rows = self._index.search(np.ascontiguousarray(queries, np.float32), k)
        return sims.astype(np.float32), rows.astype(np.int64)


def neighbours(index: Index, queries: np.ndarray, query_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest base rows of each query other than the query's own row.

    Args:
        index: over the base.
        queries: float32[Q, D].
        query_rows: int64[Q], each query's own row in the base (-1: not in it).
        k: neighbours wanted.

    Returns:
        (cosines float32[Q, k], rows int64[Q, k]), -1 / NaN where fewer were found.
    """
    sims, rows = index.search(queries, k + 1)
    own = rows == query_rows[:, None]
    # drop the query's own hit (or, where it was not found, the last one), keeping the order
    drop = np.where(own.any(axis=1), own.argmax(axis=1), sims.shape[1] - 1)
    keep = np.ones_like(own)
    keep[np.arange(len(rows)), drop] = False
    sims = sims[keep].reshape(len(rows), -1)[:, :k]
    rows = rows[keep].reshape(len(rows), -1)[:, :k]
    sims = np.where(rows >= 0, sims, np.nan).astype(np.float32)
    return sims, rows
