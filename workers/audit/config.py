"""The typed config of one audit run (``jobs.audit`` builds it from its flags)."""
from __future__ import annotations

import dataclasses

from workers.audit.clusters import ClusterSettings
from workers.audit.duplicates import DuplicateSettings
from workers.audit.knn import SearchSettings
from workers.audit.labels import LabelSettings
from workers.audit.quality import QualitySettings
from workers.graph import PoolSettings
from workers.runs import check_run_id


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """One audit of a prepared dataset.

    Attributes:
        root: dataset root written by prepare (local or s3://).
        output: audit folder (its tables, summary.json, report.html); e.g. ``<root>/audit``.
        embeddings: embeddings table to audit (``embeddings/<name>``; "" = the faces table's own).
        against: an LFW-style pairs file or a dataset root whose faces are an evaluation set: faces of
            ``root`` that duplicate them are train/test leaks ("" = none).
        against_dataset: with a pairs file, the dataset holding its images ("" = ``root``).
        cluster: also cluster the faces (labels ignored) into identities.
        all_faces: audit every face of an image, not only ``face_index == 0``.
        labels, duplicates, quality, clusters, search: the findings' settings.
        pool: the search actors' pool.
        shards_per_chunk: faces shards' worth of rows per search call.
        storage_options: fsspec options.
        run_id: recorded in every row ("" = generated).
        report_examples: worst examples per finding shown in report.html.
    """

    root: str
    output: str
    embeddings: str = ""
    against: str = ""
    against_dataset: str = ""
    cluster: bool = False
    all_faces: bool = False
    labels: LabelSettings = LabelSettings()
    duplicates: DuplicateSettings = DuplicateSettings()
    quality: QualitySettings = QualitySettings()
    clusters: ClusterSettings = ClusterSettings()
    search: SearchSettings = SearchSettings(k=10)
    pool: PoolSettings = PoolSettings(shards_per_call=1)
    chunk_size: int = 16384
    storage_options: tuple[tuple[str, str], ...] = ()
    run_id: str = ""
    report_examples: int = 12

    def __post_init__(self) -> None:
        if not self.root or not self.output:
            raise ValueError("an audit needs a dataset root and an output folder")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.report_examples < 0:
            raise ValueError(f"report_examples must be >= 0, got {self.report_examples}")
        if self.against_dataset and not self.against:
            raise ValueError("against_dataset needs against (a pairs file)")
        check_run_id(self.run_id)
