"""The pieces of ``scripts/bench_train.py``: its config, synthetic datasets, the watched training run, the
in-process anchor, and the printed tables."""
