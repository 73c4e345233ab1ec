"""The shard graph every batch job runs on Ray Data, and the planning of its actor pool.

    items (one per shard) -> read (CPU task) -> actor pool (GPU where present) -> commit (CPU task) -> summary rows

prepare (decode -> detect/align/embed -> commit records), re-embed (read stored crops -> embed -> commit
embeddings) and the jobs to come use :func:`run_shard_graph`; each brings its three stages (a
:class:`Stage` for the tasks, its actor class with its config) and the pool settings (:class:`PoolSettings`).
:func:`plan_pool` plans the resources once, against the connected cluster, before any work. Only one small
summary row per shard comes back to the driver, as each shard commits.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Literal

from workers import storage


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """How a job's actor pool is asked for (the ``--actors ... --shards-per-call`` flags).

    Attributes:
        actors: actors (0: one per GPU share where the cluster has GPUs, else 1).
        gpus_per_actor: GPU share of each actor when the cluster has GPUs.
        cpus_per_actor: CPUs each actor reserves.
        torch_threads: intra-op threads per actor (0: :func:`actor_threads`).
        shards_per_call: shards handed to one actor call.
        device: "auto" (CUDA where the actor has a GPU), "cuda" or "cpu".
    """

    actors: int = 0
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    torch_threads: int = 0
    shards_per_call: int = 2
    device: Literal["auto", "cuda", "cpu"] = "auto"

    def __post_init__(self) -> None:
        check_pool_settings(self.actors, self.gpus_per_actor, self.cpus_per_actor, self.torch_threads,
                            self.shards_per_call, self.device)


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """The pool as planned on the connected cluster.

    Attributes:
        actors: actors in the pool.
        gpus: GPUs per actor (0 on a CPU-only cluster or with ``device="cpu"``).
        threads: torch intra-op threads per actor.
        write_cpus: CPUs each commit task asks for.
    """

    actors: int
    gpus: float
    threads: int
    write_cpus: float


@dataclasses.dataclass(frozen=True)
class Stage:
    """A task stage of the graph: ``fn(row, **kwargs) -> row`` with ``cpus`` CPUs per task."""

    fn: Callable[..., dict]
    kwargs: dict = dataclasses.field(default_factory=dict)
    cpus: float = 1.0


def plan_pool(pool: PoolSettings, feeding_cpus: float, fused_on_cpu: bool = False) -> PoolPlan:
    """Plan an actor pool on the connected Ray cluster, before any work.

    Args:
        pool: the settings.
        feeding_cpus: CPUs one read task needs beside the actors.
        fused_on_cpu: the read task asks for what a CPU-only actor asks for, so that Ray Data fuses it into
            the actors when the pool gets no GPU (then it needs no CPUs of its own).

    Raises:
        ValueError: the actors would leave too few CPUs for the tasks that feed them.
    """
    actors, gpus = actor_resources(pool.actors, pool.gpus_per_actor, pool.device)
    feeding_cpus = 0.0 if fused_on_cpu and not gpus else feeding_cpus
    threads, write_cpus = plan_actor_pool(actors, pool.cpus_per_actor, gpus, feeding_cpus, pool.torch_threads)
    return PoolPlan(actors=actors, gpus=gpus, threads=threads, write_cpus=write_cpus)


def run_shard_graph(items: list[dict], read: Stage, actor: type, actor_config: Any, pool: PoolSettings,
                    plan: PoolPlan, commit: Stage) -> Iterator[dict]:
    """Run read -> actor pool -> commit over ``items`` and yield each shard's summary row as it commits.

    Args:
        items: one dict per shard (what ``read.fn`` takes).
        read: the read/decode task stage.
        actor: a Ray Data callable class, built once per actor as ``actor(config=actor_config)``, called on
            batches of ``pool.shards_per_call`` read rows (numpy columns).
        actor_config: its config.
        pool: the pool settings (CPUs per actor, shards per call).
        plan: :func:`plan_pool` of them.
        commit: the commit task stage (its CPUs are ``plan.write_cpus``).
    """
    import ray

    warm_workers(sorted({read.fn.__module__, actor.__module__, commit.fn.__module__}))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(read.fn, fn_kwargs=read.kwargs, num_cpus=read.cpus)
    ds = ds.map_batches(actor, fn_constructor_kwargs={"config": actor_config}, batch_size=pool.shards_per_call,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=plan.actors),
                        num_gpus=plan.gpus or None, num_cpus=pool.cpus_per_actor)  # Ray Data restarts dead actors
    ds = ds.map(commit.fn, fn_kwargs=commit.kwargs, num_cpus=plan.write_cpus)
    yield from _rows_as_they_come(ds)


def warm_workers(modules: list[str], workers: int = 1) -> list:
    """Import Ray Data and ``modules`` in ``workers`` idle Ray worker processes, without waiting.

    The first commit task otherwise lands on a cold worker that imports them on the spot (2-4 s on
    2 loaded CPUs, after the first actor call); Ray hands the warmed worker to the next task.

    Returns:
        The warm-up tasks' refs (their worker pids).
    """
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_import_all)
    return [task.remote(["ray.data", *modules]) for _ in range(workers)]


def _import_all(modules: list[str]) -> int:
    import importlib
    import os

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a warm-up never fails a run; the stage imports what it needs
            pass
    return os.getpid()


def _rows_as_they_come(ds) -> Iterator[dict]:
    """The rows of ``ds`` (as ``ds.iter_rows()`` gives them), each block as soon as it is done.

    ``iter_rows`` prefetches one block, and so hands over a block only once the next one is done: a
    shard's summary row reached the driver one commit late (one whole actor call: 24 s on 2 CPUs at the
    default shard size), and the last two together.
    """
    from ray.data.block import BlockAccessor

    for batch in ds.iter_batches(batch_size=None, batch_format=None, prefetch_batches=0):
        yield from BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).iter_rows(public_row_format=True)


def check_pool_settings(actors: int, gpus_per_actor: float, cpus_per_actor: float, torch_threads: int,
                        shards_per_call: int, device: str) -> None:
    """Validate the actor-pool settings shared by every stage.

    Raises:
        ValueError: naming the first bad value.
    """
    if actors < 0:
        raise ValueError(f"actors must be >= 0 (0: one per GPU, or 1 on CPU), got {actors}")
    if not 0 < gpus_per_actor <= 8:
        raise ValueError(f"gpus_per_actor must be in (0, 8], got {gpus_per_actor}")
    if not 0 < cpus_per_actor <= 256:
        raise ValueError(f"cpus_per_actor must be in (0, 256], got {cpus_per_actor}")
    if torch_threads < 0:
        raise ValueError(f"torch_threads must be >= 0 (0: automatic), got {torch_threads}")
    if shards_per_call < 1:
        raise ValueError(f"shards_per_call must be >= 1, got {shards_per_call}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")


def actor_resources(actors: int, gpus_per_actor: float, device: str) -> tuple[int, float]:
    """(actors, GPUs per actor) on the connected cluster: one actor per GPU share where it has GPUs and the
    device allows them, else ``actors`` (default 1) CPU actors."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
    if gpus:
        return actors or max(1, int(gpus // gpus_per_actor)), gpus_per_actor
    return actors or 1, 0.0


def check_cluster(paths: list[str], device: str, precision: str, shared_fs: bool) -> None:
    """What only the connected Ray cluster can tell, checked before any work.

    Raises:
        ValueError: ``--device cuda`` or float16 on a cluster without GPUs; local paths on a cluster of
            several nodes (the other nodes would not see them) without ``shared_fs``.
    """
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and not gpus:
        raise ValueError("--device cuda, but the Ray cluster has no GPU; use --device auto or cpu")
    if precision == "float16" and (device == "cpu" or not gpus):
        raise ValueError("--embed-precision float16 needs CUDA and the Ray cluster has no GPU; use float32 "
                         "or bfloat16")
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    local = [p for p in paths if p and not storage.is_remote(p)]
    if nodes > 1 and local and not shared_fs:
        raise ValueError(f"the Ray cluster has {nodes} nodes, but {local[0]!r} is a local path the other nodes "
                         f"may not see; use s3:// (or a shared mount, and pass --shared-fs)")


def alive_node_cpus() -> list[float]:
    """CPUs of each alive node of the connected Ray cluster."""
    import ray

    return [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]


def actor_threads(requested: int, cpus_per_actor: float, gpus_per_actor: float, actors: int,
                  node_cpus: list[float]) -> int:
    """Torch intra-op threads of each face actor.

    ``requested`` when set. Otherwise the actor's reserved CPUs, except on a single CPU-only node (a
    laptop, the embedded local Ray), where the actors share all of the node's cores: one actor on
    2 cores ran the LFW prepare at 29.4 img/s with 2 threads against 21.5 with 1 (docs/performance.md).
    """
    if requested:
        return requested
    own = max(1, int(cpus_per_actor))
    if gpus_per_actor or len(node_cpus) != 1:
        return own
    return max(own, int(node_cpus[0] // max(1, actors)))


def check_cpu_headroom(actors: int, cpus_per_actor: float, task_cpus: float, cluster_cpus: float) -> None:
    """Refuse an actor pool that would leave too few CPUs for the read/decode tasks that feed it: Ray
    would wait for them forever.

    Ray Data fuses decode into the face actor only when both ask for the same resources (CPU-only runs
    with one CPU per actor; then ``task_cpus`` is 0); otherwise decode runs as separate tasks beside them.

    Args:
        actors: actors in the pool.
        cpus_per_actor: CPUs each reserves.
        task_cpus: CPUs one feeding task needs.
        cluster_cpus: CPUs of the cluster now.

    Raises:
        ValueError: the actors leave less than ``task_cpus`` free.
    """
    reserved = actors * cpus_per_actor
    if task_cpus and reserved > cluster_cpus - task_cpus:
        raise ValueError(f"{actors} actor(s) x {cpus_per_actor:g} CPUs reserve {reserved:g} of the cluster's "
                         f"{cluster_cpus:g} CPUs, leaving less than the {task_cpus:g} its read/decode tasks need; "
                         f"lower --actors or --cpus-per-actor")


WRITE_TASK_CPUS = 0.5


def write_task_cpus(reserved: float, feeding_cpus: float, cluster_cpus: float) -> float:
    """CPUs each write task asks for: ``WRITE_TASK_CPUS``, or what the actors and one feeding task leave
    free, down to 0.

    A write task that cannot be scheduled while the actors live stops the stream: every result then
    waits in the object store until the last actor exits (seen: ``--actors 2`` on 2 CPUs wrote nothing
    for 60 s, then all 16 shards at once). Writes are light (JPEG-encode the crops, one Parquet file
    per shard), so running them beside the actors without a reservation costs little.

    Args:
        reserved: CPUs the actor pool reserves.
        feeding_cpus: CPUs one read/decode task needs (0 when decode is fused into the actors).
        cluster_cpus: CPUs of the cluster now.
    """
    return max(0.0, min(WRITE_TASK_CPUS, cluster_cpus - reserved - feeding_cpus))


def plan_actor_pool(actors: int, cpus_per_actor: float, gpus_per_actor: float, feeding_cpus: float,
                    torch_threads: int) -> tuple[int, float]:
    """Check an actor pool against the connected Ray cluster before any work (:func:`check_cpu_headroom`).

    Returns:
        (torch threads per actor (:func:`actor_threads`), CPUs per write task (:func:`write_task_cpus`)).
    """
    import ray

    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    check_cpu_headroom(actors, cpus_per_actor, feeding_cpus, cluster_cpus)
    threads = actor_threads(torch_threads, cpus_per_actor, gpus_per_actor, actors, alive_node_cpus())
    return threads, write_task_cpus(actors * cpus_per_actor, feeding_cpus, cluster_cpus)
