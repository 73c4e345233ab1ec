"""Every Arrow schema and column name facemill reads or writes (one home: tables.py, audit.py)."""
from schemas.tables import *  # noqa: F401,F403
from schemas import audit  # noqa: F401  (audit tables: schemas.audit.LABELS_SCHEMA, ...)
