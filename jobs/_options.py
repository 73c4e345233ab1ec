"""Command-line options shared by the jobs, their defaults read from the typed configs they fill.

Config flows one way: argparse -> a typed frozen config -> the actors. ``jobs.prepare`` and
``jobs.reprocess --incremental`` build their parsers from :func:`add_prepare_options` and
:func:`add_pool_options` and turn the parsed namespace into a ``PrepareConfig`` with :func:`prepare_config`;
no job parses another job's argv.
"""
from __future__ import annotations

import argparse

#: The prepare-only options (dest names), for jobs that accept them in one mode only.
PREPARE_ONLY = ("min_face_size", "thresholds", "factor", "select", "max_faces", "crop_size", "crop_margin",
                "max_pixels", "shard_size", "retry_errors")


def add_pool_options(group, what: str = "actors") -> None:
    """``--shards-per-call --actors --gpus-per-actor --cpus-per-actor --device --torch-threads``."""
    from workers.graph import PoolSettings

    d = PoolSettings()
    group.add_argument("--shards-per-call", type=int, default=d.shards_per_call)
    group.add_argument("--actors", type=int, default=d.actors, help=f"{what} (0: one per GPU, or 1 on CPU)")
    group.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor)
    group.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor)
    group.add_argument("--device", choices=("auto", "cuda", "cpu"), default=d.device)
    group.add_argument("--torch-threads", type=int, default=d.torch_threads,
                       help="intra-op threads per actor (0: its CPUs; on a one-node CPU-only Ray, the node's "
                            "cores shared between the actors)")


def pool_settings(args: argparse.Namespace):
    """The ``PoolSettings`` of parsed :func:`add_pool_options` (ValueError on a bad value)."""
    from workers.graph import PoolSettings

    return PoolSettings(actors=args.actors, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                        torch_threads=args.torch_threads, shards_per_call=args.shards_per_call, device=args.device)


def add_precision_option(group, default: str = "float32") -> None:
    from workers.faces.config import PRECISIONS

    group.add_argument("--embed-precision", choices=PRECISIONS, default=default,
                       help="embedder precision: bfloat16 is ~2x faster on CPUs with AVX512-BF16 (see "
                            "docs/performance.md for its accuracy); float16 needs CUDA")


def add_prepare_options(group, suppress: bool = False) -> None:
    """Detection, alignment, decode and sharding options of prepare.

    Args:
        group: a parser or argument group.
        suppress: leave an option out of the namespace unless given (to tell which were passed).
    """
    from workers.decode import DecodeConfig
    from workers.faces.config import AlignConfig, MTCNNConfig
    from workers.pipeline import PrepareConfig

    m, a, d, c = MTCNNConfig(), AlignConfig(), DecodeConfig(), PrepareConfig(input="", output="")

    def default(value):
        return argparse.SUPPRESS if suppress else value

    group.add_argument("--min-face-size", type=int, default=default(m.min_face_size))
    group.add_argument("--thresholds", type=float, nargs=3, default=default(m.thresholds))
    group.add_argument("--factor", type=float, default=default(m.factor))
    group.add_argument("--select", choices=("all", "largest", "center"), default=default(m.select))
    group.add_argument("--max-faces", type=int, default=default(m.max_faces), help="per image, 0 = no limit")
    group.add_argument("--crop-size", type=int, default=default(a.size))
    group.add_argument("--crop-margin", type=float, default=default(a.margin))
    group.add_argument("--max-pixels", type=int, default=default(d.max_pixels))
    group.add_argument("--shard-size", type=int, default=default(c.shard_size))
    group.add_argument("--retry-errors", action="store_true", default=default(False),
                       help="reprocess every error row (transient errors such as read_failed are always retried)")


def prepare_config(args: argparse.Namespace, storage_options: tuple, run_id: str):
    """The ``PrepareConfig`` of parsed prepare options (options left out of ``args`` keep their defaults).

    Raises:
        ValueError: a bad value (the config's own check).
    """
    from workers.decode import DecodeConfig
    from workers.faces.config import AlignConfig, EngineConfig, MTCNNConfig
    from workers.pipeline import PrepareConfig

    m, a, d, c = MTCNNConfig(), AlignConfig(), DecodeConfig(), PrepareConfig(input="", output="")

    def get(name, fallback):
        return getattr(args, name, fallback)

    return PrepareConfig(
        input=args.input, output=args.output, embedder=args.embedder or c.embedder,
        engine=EngineConfig(
            mtcnn=MTCNNConfig(min_face_size=get("min_face_size", m.min_face_size),
                              thresholds=tuple(get("thresholds", m.thresholds)), factor=get("factor", m.factor),
                              select=get("select", m.select), max_faces=get("max_faces", m.max_faces)),
            align=AlignConfig(size=get("crop_size", a.size), margin=get("crop_margin", a.margin)),
            embed_precision=args.embed_precision),
        decode=DecodeConfig(max_pixels=get("max_pixels", d.max_pixels)), shard_size=get("shard_size", c.shard_size),
        pool=pool_settings(args), storage_options=storage_options, run_id=run_id,
        retry_errors=get("retry_errors", False), shared_fs=args.shared_fs)
