"""The benchmark's config (every field a ``--flag``) and its targets."""
from __future__ import annotations

import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

NOTE = ("NOTE: synthetic identities are re-labelled LFW crops (each crop reused under many identities): "
        "these numbers are for memory and throughput only, never for accuracy.")
RSS_SLACK = int(1.5 * (1 << 30))   # target: worker peak RSS <= its JPEG share + 1.5 GB
FIRST_STEP_TARGET_S = 120.0
ANCHOR_RATIO_TARGET = 0.9
MAX_CHUNK = 20_000                 # faces per commit: a 30k-uri commit_records predicate segfaults delta-rs



@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark invocation (every field is a ``--flag``; see the module docstring)."""

    sizes: tuple[str, ...] = ("200000", "1000000")
    steps: int = 20
    workers: int = 2
    work: str = "/tmp/bench_train"
    lfw: str = "/tmp/study/lfw"
    json: str = ""
    skip_anchor: bool = False
    people_per_batch: int = 16
    images_per_person: int = 4
    faces_per_identity: int = 10
    chunk: int = 10_000
    heldout_identities: int = 8
    seed: int = 0
    local_cpus: int = 2
    anchor_repeats: int = 3
    anchor_cpus: int = 1
    timeout_s: float = 3600.0
    train_args: str = ""
