"""The faces an audit says to leave out of training (``jobs.train --exclude-audit``).

A face is excluded when the last complete audit flagged it as

* ``label``: a label suspect, or one of the faces of an identity flagged as two people;
* ``quality``: below the quality threshold;
* ``duplicate``: the second face (``b``) of a same-photo pair, so one copy stays;
* ``label_conflict``: either face of a same-photo pair under two names (which name is right is unknown);
* ``leak``: a near-copy of an evaluation image.
"""
from __future__ import annotations

import functools

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from workers.audit.store import read_audit, read_summary

A = S.audit
KEYS = [S.IMAGE_ID, S.FACE_INDEX]


def excluded_faces(output: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Columns image_id, face_index, reason: one row per excluded face (its first reason).

    Raises:
        StorageError: ``output`` holds no complete audit.
    """
    tables = read_summary(output, storage_options)["tables"]
    parts = []

    def flagged(name: str, columns: list[str]) -> pd.DataFrame:
        if name not in tables:
            return pd.DataFrame(columns=columns)
        t = read_audit(output, name, storage_options, columns=[*columns, A.FLAGGED]).to_pandas()
        return t[t[A.FLAGGED]].drop(columns=[A.FLAGGED])

    if A.AUDIT_LABELS in tables:
        labels = read_audit(output, A.AUDIT_LABELS, storage_options,
                            columns=[*KEYS, S.IDENTITY, A.FLAGGED]).to_pandas()
        split = set(flagged(A.AUDIT_IDENTITIES, [S.IDENTITY])[S.IDENTITY])
        bad = labels[labels[A.FLAGGED] | labels[S.IDENTITY].isin(split)]
        parts.append(bad[KEYS].assign(reason="label"))
    parts.append(flagged(A.AUDIT_QUALITY, KEYS).assign(reason="quality"))
    dups = flagged(A.AUDIT_DUPLICATES, [*(k + s for s in ("_a", "_b") for k in KEYS), A.KIND])

    def side(frame: pd.DataFrame, suffix: str, reason: str) -> pd.DataFrame:
        return frame[[k + suffix for k in KEYS]].set_axis(KEYS, axis=1).assign(reason=reason)

    leak = dups[A.KIND] == A.DUP_LEAK
    conflict = dups[A.KIND] == A.DUP_CROSS_IDENTITY
    parts += [side(dups[leak], "_a", "leak"), side(dups[conflict], "_a", "label_conflict"),
              side(dups[conflict], "_b", "label_conflict"), side(dups[~leak & ~conflict], "_b", "duplicate")]
    out = pd.concat([p for p in parts if len(p)] or [pd.DataFrame(columns=[*KEYS, "reason"])], ignore_index=True)
    out[S.FACE_INDEX] = out[S.FACE_INDEX].astype("int64")
    return out.drop_duplicates(KEYS, ignore_index=True)


@functools.lru_cache(maxsize=8)
def _filter(output: str, options: tuple) -> pc.Expression | None:
    faces = excluded_faces(output, dict(options))
    expr = None
    for face_index, group in faces.groupby(S.FACE_INDEX):
        ids = pa.array(sorted(group[S.IMAGE_ID].unique()), pa.string())
        one = (pc.field(S.FACE_INDEX) == int(face_index)) & pc.field(S.IMAGE_ID).isin(ids)
        expr = one if expr is None else expr | one
    return None if expr is None else ~expr


def exclusion_filter(output: str | None, storage_options: tuple[tuple[str, str], ...] = ()) -> pc.Expression | None:
    """A scan filter over the faces view that drops the faces :func:`excluded_faces` names (None: none).

    Read once per audit folder and process (the tables a summary names do not change).
    """
    return _filter(output, tuple(storage_options)) if output else None
