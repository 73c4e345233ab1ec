"""Arrow schemas of the audit tables (``jobs.audit``), each a Delta table under the audit output folder.

Every finding is a table with the evidence, a ``score`` (higher: more certainly a problem, except
``quality`` where higher is better) and ``flagged`` (the default or given threshold applied), so a user can
re-threshold without rerunning. Faces are keyed as in the faces table: image_id, face_index, shard.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.tables import FACE_INDEX, IDENTITY, IMAGE_ID, RUN_ID, SHARD, URI

AUDIT_VERSION = "1"

# Table names (folders under the audit output).
AUDIT_LABELS = "labels"            # per face with an identity: is it someone else?
AUDIT_IDENTITIES = "identities"    # per identity: two people under one name?
AUDIT_DUPLICATES = "duplicates"    # per candidate pair of faces: the same photo?
AUDIT_QUALITY = "quality"          # per face: how usable
AUDIT_CLUSTERS = "clusters"        # per face (--cluster): identity clusters of the embeddings
AUDIT_TABLES = (AUDIT_LABELS, AUDIT_IDENTITIES, AUDIT_DUPLICATES, AUDIT_QUALITY, AUDIT_CLUSTERS)

# Column names.
SCORE_ = "score"
FLAGGED = "flagged"
OWN_COSINE = "own_cosine"
OTHER_IDENTITY = "other_identity"
OTHER_COSINE = "other_cosine"
FACES_ = "faces"
GROUP_SIZES = "group_sizes"
SPLIT_COSINE = "split_cosine"
GROUP_COHESION = "group_cohesion"
COSINE = "cosine"
PIXEL_SIMILARITY = "pixel_similarity"
KIND = "kind"
CLUSTER = "cluster"
CONFIDENCE = "confidence"
QUALITY_MEASURES = ("face_size_px", "detection_strength", "sharpness", "yaw", "pitch", "roll")
QUALITY_PARTS = ("q_size", "q_detection", "q_sharpness", "q_pose")

# Duplicate kinds.
DUP_SAME_IDENTITY = "same_identity"      # one photo twice under one name
DUP_CROSS_IDENTITY = "cross_identity"    # one photo under two names: a label conflict
DUP_LEAK = "leak"                        # a face of the audited set duplicates an evaluation image
DUP_KINDS = (DUP_SAME_IDENTITY, DUP_CROSS_IDENTITY, DUP_LEAK)

_META = {b"facemill.audit_version": AUDIT_VERSION.encode()}


def _key_fields(suffix: str = "") -> list[pa.Field]:
    return [pa.field(IMAGE_ID + suffix, pa.string(), nullable=False), pa.field(URI + suffix, pa.string(), nullable=False),
            pa.field(IDENTITY + suffix, pa.string()), pa.field(SHARD + suffix, pa.string(), nullable=False),
            pa.field(FACE_INDEX + suffix, pa.int32(), nullable=False)]


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema([*fields, pa.field(RUN_ID, pa.string(), nullable=False)],
                     metadata={**_META, b"facemill.table": f"audit/{name}".encode()})


LABELS_SCHEMA = _schema(AUDIT_LABELS, [
    *_key_fields(), pa.field(OWN_COSINE, pa.float32()), pa.field(OTHER_IDENTITY, pa.string()),
    pa.field(OTHER_COSINE, pa.float32()), pa.field(SCORE_, pa.float32()), pa.field(FLAGGED, pa.bool_(), nullable=False)])

IDENTITIES_SCHEMA = _schema(AUDIT_IDENTITIES, [
    pa.field(IDENTITY, pa.string(), nullable=False), pa.field(FACES_, pa.int32(), nullable=False),
    pa.field(GROUP_SIZES, pa.list_(pa.int32())), pa.field(SPLIT_COSINE, pa.float32()),
    pa.field(GROUP_COHESION, pa.float32()), pa.field(SCORE_, pa.float32()),
    pa.field(FLAGGED, pa.bool_(), nullable=False)])

DUPLICATES_SCHEMA = _schema(AUDIT_DUPLICATES, [
    *_key_fields("_a"), *_key_fields("_b"), pa.field(COSINE, pa.float32(), nullable=False),
    pa.field(PIXEL_SIMILARITY, pa.float32(), nullable=False), pa.field(KIND, pa.string(), nullable=False),
    pa.field(SCORE_, pa.float32(), nullable=False), pa.field(FLAGGED, pa.bool_(), nullable=False)])

QUALITY_SCHEMA = _schema(AUDIT_QUALITY, [
    *_key_fields(), *[pa.field(n, pa.float32()) for n in (*QUALITY_MEASURES, *QUALITY_PARTS)],
    pa.field(SCORE_, pa.float32(), nullable=False), pa.field(FLAGGED, pa.bool_(), nullable=False)])

CLUSTERS_SCHEMA = _schema(AUDIT_CLUSTERS, [
    *_key_fields(), pa.field(CLUSTER, pa.int64(), nullable=False), pa.field(CONFIDENCE, pa.float32())])

AUDIT_SCHEMAS = {AUDIT_LABELS: LABELS_SCHEMA, AUDIT_IDENTITIES: IDENTITIES_SCHEMA,
                 AUDIT_DUPLICATES: DUPLICATES_SCHEMA, AUDIT_QUALITY: QUALITY_SCHEMA, AUDIT_CLUSTERS: CLUSTERS_SCHEMA}
