"""The pieces of ``scripts/bench_prepare.py``: workloads, the anchor (facenet-pytorch), measurement, the runs,
and the printed table."""
