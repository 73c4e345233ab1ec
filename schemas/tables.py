"""Arrow/Parquet schemas of every table facemill writes, with their column names and version.

Readers and writers import from here; nothing else spells a column name. Tables:

* ``images``: one row per input file, whatever happened to it (``status`` ok | no_face | error).
* ``faces``: one row per detected face: box, landmarks, aligned crop, embedding.
* ``embeddings``: one row per face and embedder, written by ``reprocess`` beside the original.

Coordinates: boxes are ``x1 y1 x2 y2`` pixel edges of the original (EXIF-rotated) image; landmarks are
``x y`` pixel centres (OpenCV convention), in the order left eye, right eye, nose, left mouth, right mouth
(left/right as seen in the image).
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
EMBEDDING_DIM = 128

STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_NO_FACE, STATUS_ERROR)

# Error reasons recorded in images.error (the only values it takes).
ERR_EMPTY = "empty_file"
ERR_READ = "read_failed"
ERR_NOT_IMAGE = "not_an_image"
ERR_TRUNCATED = "truncated"
ERR_TOO_LARGE = "too_large"
ERR_TOO_SMALL = "too_small"
ERR_DECODE = "decode_failed"
ERR_PROCESS = "processing_failed"
ERROR_REASONS = (ERR_EMPTY, ERR_READ, ERR_NOT_IMAGE, ERR_TRUNCATED, ERR_TOO_LARGE, ERR_TOO_SMALL,
                 ERR_DECODE, ERR_PROCESS)

# Table names: sub-folders of an output dataset.
IMAGES = "images"
FACES = "faces"
EMBEDDINGS = "embeddings"

# Column names.
IMAGE_ID = "image_id"
URI = "uri"
IDENTITY = "identity"
SHARD = "shard"
WIDTH = "width"
HEIGHT = "height"
STATUS = "status"
ERROR = "error"
ERROR_DETAIL = "error_detail"
NUM_FACES = "num_faces"
FINGERPRINT = "fingerprint"
RUN_ID = "run_id"
FACE_INDEX = "face_index"
BOX = "box"
SCORE = "score"
LANDMARKS = "landmarks"
CROP = "crop"
EMBEDDING = "embedding"
EMBEDDER = "embedder"
EMBEDDER_VERSION = "embedder_version"

_META = {b"facemill.schema_version": SCHEMA_VERSION.encode()}


def _with_meta(fields: list[pa.Field], table: str) -> pa.Schema:
    return pa.schema(fields, metadata={**_META, b"facemill.table": table.encode()})


IMAGES_SCHEMA = _with_meta([
    pa.field(IMAGE_ID, pa.string(), nullable=False),
    pa.field(URI, pa.string(), nullable=False),
    pa.field(IDENTITY, pa.string()),
    pa.field(SHARD, pa.string(), nullable=False),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(ERROR, pa.string()),
    pa.field(ERROR_DETAIL, pa.string()),
    pa.field(NUM_FACES, pa.int32(), nullable=False),
    pa.field(FINGERPRINT, pa.string()),
    pa.field(RUN_ID, pa.string(), nullable=False),
], IMAGES)


def faces_schema(embedding_dim: int = EMBEDDING_DIM) -> pa.Schema:
    """Schema of the ``faces`` table for an embedder of ``embedding_dim`` outputs."""
    return _with_meta([
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(IDENTITY, pa.string()),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(FACE_INDEX, pa.int32(), nullable=False),
        pa.field(BOX, pa.list_(pa.float32(), 4), nullable=False),
        pa.field(SCORE, pa.float32(), nullable=False),
        pa.field(LANDMARKS, pa.list_(pa.float32(), 10), nullable=False),
        pa.field(CROP, pa.binary(), nullable=False),
        pa.field(EMBEDDING, pa.list_(pa.float32(), embedding_dim), nullable=False),
        pa.field(EMBEDDER, pa.string(), nullable=False),
        pa.field(EMBEDDER_VERSION, pa.string(), nullable=False),
        pa.field(RUN_ID, pa.string(), nullable=False),
    ], FACES)


FACES_SCHEMA = faces_schema()


def embeddings_schema(embedding_dim: int = EMBEDDING_DIM) -> pa.Schema:
    """Schema of an ``embeddings`` table: one embedder's vectors for faces of a ``faces`` table."""
    return _with_meta([
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(IDENTITY, pa.string()),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(FACE_INDEX, pa.int32(), nullable=False),
        pa.field(EMBEDDING, pa.list_(pa.float32(), embedding_dim), nullable=False),
        pa.field(EMBEDDER, pa.string(), nullable=False),
        pa.field(EMBEDDER_VERSION, pa.string(), nullable=False),
        pa.field(RUN_ID, pa.string(), nullable=False),
    ], EMBEDDINGS)


EMBEDDINGS_SCHEMA = embeddings_schema()

# Manifest inputs (CSV or Parquet): a uri column and an optional identity column.
MANIFEST_URI = URI
MANIFEST_IDENTITY = IDENTITY

__all__ = [name for name in dir() if name.isupper() or name.endswith("_schema")]
