"""Run identity shared by every job: run ids (they name ``<root>/_runs/<run_id>.json``) and the config record."""
from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid

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
