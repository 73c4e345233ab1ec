"""Shared entrypoint plumbing: connect to Ray (cluster, or an embedded local one) and fail with one line."""
from __future__ import annotations

import os
import sys


def connect_ray(local_cpus: int | None = None) -> None:
    """Join the cluster of ``ray job submit`` (RAY_ADDRESS) or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        _watch_embedded_ray()
        ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = sys.stderr.isatty()
        ctx.print_on_execution_start = False
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _watch_embedded_ray() -> None:
    """Start jobs._watchdog for the embedded Ray this driver is about to start: it kills that Ray's
    processes once this driver is gone (a SIGKILLed driver leaves Ray's agents running otherwise)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.Popen([sys.executable, "-m", "jobs._watchdog", str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def add_endpoint_option(p) -> None:
    """``--s3-endpoint-url`` (every job that reads or writes storage)."""
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")


def add_ray_options(p) -> None:
    """``--s3-endpoint-url`` and ``--local-cpus`` (every job that runs on Ray)."""
    add_endpoint_option(p)
    p.add_argument("--local-cpus", type=int, default=None, help="CPUs of the embedded local Ray")


def or_fail(run, errors: tuple = ()):
    """``run()``, or one line and exit 2 on a user-facing error (bad input, storage, a missing file)."""
    from workers.storage import StorageError

    try:
        return run()
    except (FileNotFoundError, ValueError, StorageError, *errors) as exc:
        fail(str(exc))


def storage_options(endpoint_url: str | None) -> tuple[tuple[str, str], ...]:
    url = endpoint_url or os.environ.get("FACEMILL_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return (("endpoint_url", url),) if url else ()
