"""Run identity shared by every job: run ids (they name ``<root>/_runs/<run_id>.json``) and run records, written
and read back typed (:class:`PrepareSummary`, :class:`PrepareRecord`)."""
from __future__ import annotations

import dataclasses
import json
import re
import time
import typing
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # pipeline imports this module
    from workers.pipeline import PrepareConfig

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


def config_dict(cfg) -> dict:
    """A frozen config dataclass as JSON-ready nested dicts (anything else as its ``str``)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def run_record_uri(root: str, run_id: str) -> str:
    """Where a run's record lives: ``<root>/_runs/<run_id>.json``."""
    from workers import storage

    check_run_id(run_id)
    return storage.join(root, storage.RUNS, f"{run_id}.json")


def write_run_record(root: str, summary: Mapping, cfg, storage_options: dict | None = None) -> str:
    """Write a run's record, its summary with its config (:func:`config_dict`) under "config"; returns the URI."""
    from workers import storage

    uri = run_record_uri(root, summary["run_id"])
    storage.write_json(uri, {**summary, "config": config_dict(cfg)}, storage_options)
    return uri


def _require(data: Mapping, key: str, where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    if key not in data:
        raise ValueError(f"{where} has no {key!r}")
    return data[key]


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def config_from_dict(cls: type, data: Mapping, where: str = "config"):
    """Rebuild a frozen config dataclass from its :func:`config_dict` (nested configs too, JSON lists as tuples).

    Raises:
        ValueError: a field is missing (named by its path, e.g. ``config.engine.align.margin``), or the
            config's own checks refuse a value.
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        value = _require(data, field.name, where)
        kind = hints[field.name]
        kinds = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
        nested = next((k for k in kinds if dataclasses.is_dataclass(k)), None)
        if nested is not None and value is not None:
            value = config_from_dict(nested, value, f"{where}.{field.name}")
        values[field.name] = _tuples(value)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """The summary of one prepare run (``summary.json`` and the top of its run record).

    Attributes are the summary's keys; counts are images unless named otherwise. ``settings``,
    ``table_version`` and ``nothing_to_do`` are added once the run has committed (None / False before).
    """

    run_id: str
    input: str
    output: str
    embedder: str
    schema_version: int
    images_listed: int
    images_already_done: int
    images_in: int
    images_with_faces: int
    images_no_face: int
    images_error: int
    errors_by_reason: Mapping[str, int]
    faces: int
    shards: int
    skipped_non_image_files: int
    skipped_by_reason: Mapping[str, int]
    skipped_examples: tuple[str, ...]
    median_face_size_px: float | None
    wall_time_s: float
    images_per_s: float | None
    settings: str | None = None
    table_version: int | None = None
    nothing_to_do: bool = False

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "prepare summary") -> "PrepareSummary":
        """Parse a summary dict once.

        Raises:
            ValueError: a key is missing (the first one, named).
        """
        values = {}
        for field in dataclasses.fields(cls):
            if field.default is dataclasses.MISSING:
                values[field.name] = _require(data, field.name, where)
            else:
                values[field.name] = data.get(field.name, field.default)
        values["skipped_examples"] = tuple(values["skipped_examples"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class PrepareRecord:
    """A prepare run's record (``<root>/_runs/<run_id>.json``), parsed once: its summary and its config."""

    summary: PrepareSummary
    config: PrepareConfig

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "run record") -> "PrepareRecord":
        from workers.pipeline import PrepareConfig

        return cls(PrepareSummary.from_dict(data, where),
                   config_from_dict(PrepareConfig, _require(data, "config", where), f"{where}.config"))


def read_prepare_record(root: str, run_id: str, storage_options: dict | None = None) -> PrepareRecord:
    """Read and parse a prepare run's record.

    Raises:
        FileNotFoundError: no record for that run.
        ValueError: the record is not a prepare run's (a key missing, named).
    """
    from workers import storage

    uri = run_record_uri(root, run_id)
    fs, path = storage.url_to_fs(uri, storage_options)
    return PrepareRecord.from_dict(json.loads(fs.cat_file(path)), f"run record {uri}")
