"""Arrow schemas of every table facemill writes, with their column names and version.

Readers and writers import from here; nothing else spells a column name. On storage a dataset is Delta
Lake tables (Parquet data files + a transaction log, :mod:`workers.dataset`):

* ``records`` (the Delta table of record): for every input file one *image row* (``face_index == -1``:
  status ok | no_face | error, size, fingerprints) and one *face row* per detected face
  (``face_index >= 0``: box, landmarks, aligned crop, embedding). One shard commit replaces all rows of
  its images at once, so an image's status and its faces can never disagree.
* ``images`` and ``faces`` are views of ``records`` (:data:`IMAGES_SCHEMA`, :func:`faces_schema`).
* ``embeddings/<name>``: one row per face and embedder, written by ``reprocess`` beside the original;
  a row counts while the face row it was made from (same image_id, face_index and shard) is current.

Coordinates: boxes are ``x1 y1 x2 y2`` pixel edges of the original (EXIF-rotated) image; landmarks are
``x y`` pixel centres (OpenCV convention), in the order left eye, right eye, nose, left mouth, right mouth
(left/right as seen in the image).
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "2"      # 2: Delta Lake tables (1: Parquet files + commit markers)
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
ERR_NOT_A_FILE = "not_a_file"            # a FIFO, device, socket or folder where a file was listed
ERR_MISSING = "missing"                  # a manifest row whose file does not exist (yet)
ERR_UNSUPPORTED = "unsupported_format"   # an image format facemill cannot decode (e.g. HEIC)
ERROR_REASONS = (ERR_EMPTY, ERR_READ, ERR_NOT_IMAGE, ERR_TRUNCATED, ERR_TOO_LARGE, ERR_TOO_SMALL,
                 ERR_DECODE, ERR_PROCESS, ERR_NOT_A_FILE, ERR_MISSING, ERR_UNSUPPORTED)
# Reasons a rerun retries even when neither the file nor the settings changed (the cause is outside the
# file: storage down, a worker killed, a file not there yet). The others stay until the file or the
# settings change, or the user asks (``--retry-errors``).
TRANSIENT_ERRORS = (ERR_READ, ERR_PROCESS, ERR_MISSING)

# Table names. RECORDS and EMBEDDINGS/<name> are Delta tables (folders of a dataset root); IMAGES and
# FACES are views of RECORDS.
RECORDS = "records"
IMAGES = "images"
FACES = "faces"
EMBEDDINGS = "embeddings"
IMAGE_ROW = -1                           # face_index of an image row in RECORDS

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
SETTINGS = "settings"                    # digest of the settings that made a row (see PrepareConfig)
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
    pa.field(SETTINGS, pa.string(), nullable=False),
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


def records_schema(embedding_dim: int = EMBEDDING_DIM) -> pa.Schema:
    """Schema of the ``records`` Delta table: the union of the images and faces columns.

    Image rows (``face_index == IMAGE_ROW``) leave the face columns null; face rows leave width, height,
    status, error, error_detail and num_faces null. Fixed-size lists are stored as Delta arrays.
    """
    faces = faces_schema(embedding_dim)
    names = [IMAGE_ID, URI, IDENTITY, SHARD, FACE_INDEX, WIDTH, HEIGHT, STATUS, ERROR, ERROR_DETAIL, NUM_FACES,
             FINGERPRINT, SETTINGS, RUN_ID, BOX, SCORE, LANDMARKS, CROP, EMBEDDING, EMBEDDER, EMBEDDER_VERSION]
    keys = {IMAGE_ID, URI, SHARD, FACE_INDEX, SETTINGS, RUN_ID}
    by_name = {f.name: f for f in (*IMAGES_SCHEMA, *faces)}
    fields = []
    for name in names:
        f = by_name[name]
        typ = pa.list_(f.type.value_type) if pa.types.is_fixed_size_list(f.type) else f.type
        fields.append(pa.field(name, typ, nullable=name not in keys))
    return _with_meta(fields, RECORDS)


def stored_embeddings_schema(embedding_dim: int = EMBEDDING_DIM) -> pa.Schema:
    """Schema of an ``embeddings/<name>`` Delta table on storage (fixed-size lists as arrays)."""
    fields = [pa.field(f.name, pa.list_(f.type.value_type), f.nullable) if pa.types.is_fixed_size_list(f.type)
              else f for f in embeddings_schema(embedding_dim)]
    return _with_meta(fields, EMBEDDINGS)

# Manifest inputs (CSV or Parquet): a uri column and optional identity and fingerprint columns.
MANIFEST_URI = URI
MANIFEST_IDENTITY = IDENTITY
MANIFEST_FINGERPRINT = FINGERPRINT
# Input listings (workers.inputs.list_inputs; in memory only): uri, identity, fingerprint and this.
LISTING_SIZE = "size"                    # bytes per listed file (Int64, null where unknown)

__all__ = [name for name in dir() if name.isupper() or name.endswith("_schema")]
