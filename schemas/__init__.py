"""Every Arrow schema and column name facemill reads or writes (one home; see tables.py)."""
from schemas.tables import *  # noqa: F401,F403
