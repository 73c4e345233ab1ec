"""The driver side of a fine-tuning run: checks, the TorchTrainer, the exported embedder and the reports.

``run_training`` checks the output, the split and any checkpoint to resume before a worker starts, runs
:func:`workers.training.worker.train_loop_per_worker` on Ray Train, then ``finish_run`` exports the final
weights as an embedder and writes ``heldout.json`` and ``curves.png`` (layout: :mod:`workers.training.config`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from workers import plots, storage
from workers.runs import config_dict, new_run_id
from workers.faces.embedders import SPEC_FILE, WEIGHTS_FILE, SFace, load_embedder, save_embedder
from workers.faces.weights import ModelSpec
from workers.training.checkpoint import (
    RAY_DIR, RAY_RUN_NAME, checkpoints_in, load_checkpoint_state, read_checkpoint_state)
from workers.training.config import (
    CLEAN, CURVES_FILE, EMBEDDER_DIR, HELDOUT_FILE, METRICS_FILE, RUN_FILE, SPLIT_FILE, TrainConfig)
from workers.training.data import plan_split
from workers.training.stream import plan_shards
from workers.training.worker import read_history, train_loop_per_worker


def _resolve_use_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.use_gpu != "auto":
        return cfg.use_gpu == "true"
    return ray.cluster_resources().get("GPU", 0) >= cfg.workers


def _run_config(cfg: TrainConfig):
    import ray.train

    opts = dict(cfg.storage_options)
    root = storage.join(cfg.output, RAY_DIR)
    filesystem = None
    if "://" in root and not root.startswith("file://"):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, root = storage.url_to_fs(root, opts)
        filesystem = PyFileSystem(FSSpecHandler(fs))
    else:
        root = os.path.abspath(root.removeprefix("file://"))
    return ray.train.RunConfig(
        name=RAY_RUN_NAME, storage_path=root, storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints))


def run_training(cfg: TrainConfig, log=print) -> dict:
    """Fine-tune on the connected Ray cluster, export the embedder, write the run's reports.

    Returns:
        Summary dict (also in ``train.json``): run id, epochs, where everything went, held-out results.

    Raises:
        ValueError: bad data (too few identities), ``resume`` without a checkpoint, a refused checkpoint.
        storage.StorageError: the output is not writable.
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    from ray.train.torch import TorchConfig, TorchTrainer
    import ray.train

    t0 = time.time()
    opts = dict(cfg.storage_options)
    init = load_embedder(cfg.init)  # fail fast on a bad --init
    storage.check_writable(cfg.output, opts)
    split = plan_split(cfg.data)
    needed = cfg.workers * cfg.people_per_batch
    if len(split.train) < needed:
        raise ValueError(f"{len(split.train)} training identities (with >= {cfg.data.min_faces} faces, after "
                         f"holding out {cfg.data.heldout_fraction:.0%} and excluding {len(split.excluded)}), "
                         f"need workers * people_per_batch = {needed}; lower --people-per-batch or --workers")
    plan_shards(split, cfg.workers, cfg.people_per_batch, cfg.data.seed)   # every identity shard fills a step
    existing = checkpoints_in(cfg.output, opts)
    if cfg.resume and not existing:
        raise ValueError(f"--resume: no checkpoint under {storage.join(cfg.output, RAY_DIR, RAY_RUN_NAME)!r}")
    previous = _read_json(storage.join(cfg.output, RUN_FILE), opts)
    run_id = cfg.run_id or (previous or {}).get("run_id") or new_run_id()
    if existing:
        state = read_checkpoint_state(storage.join(cfg.output, RAY_DIR, RAY_RUN_NAME, existing[-1]), opts)
        if list(state["identities"]) != list(split.train):
            raise ValueError(f"checkpoint {existing[-1]} of {cfg.output!r} trained on {len(state['identities'])} "
                             f"identities, the faces table with this split gives {len(split.train)} different "
                             f"ones; resume with the same --faces, --exclude-pairs, --heldout-fraction and "
                             f"--seed, or use a new --output")
        run_id = cfg.run_id or state["run_id"] or run_id
        log(f"facemill train {run_id}: resuming from {existing[-1]} (epoch {state['epoch']}) in {cfg.output}")
        del state
    use_gpu = _resolve_use_gpu(cfg)
    record = {"run_id": run_id, "started_at": time.time(), "use_gpu": use_gpu, "config": config_dict(cfg),
              "identities": {"train": len(split.train), "heldout": len(split.heldout),
                             "excluded": len(split.excluded), "faces_train": split.num_faces_train,
                             "faces_heldout": split.num_faces_heldout}}
    _write_json(storage.join(cfg.output, RUN_FILE), record, opts)
    _write_json(storage.join(cfg.output, SPLIT_FILE), split.to_dict(), opts)
    log(f"facemill train {run_id}: {len(split.train)} identities ({split.num_faces_train} faces) to train, "
        f"{len(split.heldout)} held out, {len(split.excluded)} excluded; {cfg.workers} workers "
        f"{'GPU' if use_gpu else 'CPU'}, P={cfg.people_per_batch} K={cfg.images_per_person}, {cfg.epochs} epochs")

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "split": split.to_dict(), "run_id": run_id, "use_gpu": use_gpu},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=_run_config(cfg))
    result = trainer.fit()
    if result.checkpoint is None:
        raise ValueError(f"training of {cfg.output!r} reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_checkpoint_state(directory)
    summary = finish_run(cfg, state, init.spec, log)
    summary["wall_time_s"] = round(time.time() - t0, 3)
    summary["checkpoint"] = storage.join(cfg.output, RAY_DIR, RAY_RUN_NAME,
                                         result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    _write_json(storage.join(cfg.output, RUN_FILE), {**record, "finished_at": time.time(), "summary": summary},
                opts)
    return summary


def finish_run(cfg: TrainConfig, state: dict, init_spec: ModelSpec, log=print) -> dict:
    """Export the embedder of a final training state and write heldout.json and curves.png."""
    opts = dict(cfg.storage_options)
    run_name = cfg.output.rstrip("/").rsplit("/", 1)[-1] or "run"
    spec = dataclasses.replace(
        init_spec, name=f"{init_spec.name}-ft-{run_name}", weights=WEIGHTS_FILE,
        version=f"{init_spec.version}+ft-{state['run_id']}-e{state['epoch']}")
    module = SFace(embedding_dim=spec.embedding_dim, mean=spec.mean, std=spec.std)
    module.load_state_dict(state["backbone"])
    embedder_uri = storage.join(cfg.output, EMBEDDER_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        save_embedder(module.eval(), spec, tmp)
        for name in (WEIGHTS_FILE, SPEC_FILE):
            storage.put_atomic(storage.join(embedder_uri, name), (Path(tmp) / name).read_bytes(), opts)
        root_spec = json.loads((Path(tmp) / SPEC_FILE).read_text())
    root_spec["weights"] = f"{EMBEDDER_DIR}/{WEIGHTS_FILE}"
    _write_json(storage.join(cfg.output, SPEC_FILE), root_spec, opts)

    measured_before, measured_after = state["heldout_before"] or {}, state["heldout_last"] or {}
    before, after = measured_before.get(CLEAN), measured_after.get(CLEAN)
    heldout = {"before": before, "after": after,
               "domains": {d: {"before": measured_before.get(d), "after": v} for d, v in measured_after.items()},
               "epochs": int(state["epoch"]), "run_id": state["run_id"], "embedder": f"{spec.name} {spec.version}"}
    if after is None:
        heldout["note"] = "too few held-out identities with >= 2 faces for 2 folds; raise --heldout-fraction"
    _write_json(storage.join(cfg.output, HELDOUT_FILE), heldout, opts)
    history = read_history(cfg, int(state["epoch"]))
    curves = storage.join(cfg.output, CURVES_FILE)
    storage.put_atomic(curves, plots.plot_curves(history), opts)
    before, after = before or {}, after or {}
    last = history[-1] if history else {}
    summary = {
        "run_id": state["run_id"], "epochs": int(state["epoch"]), "output": cfg.output,
        "embedder": embedder_uri, "embedder_name": spec.name, "embedder_version": spec.version,
        "heldout_accuracy_before": before.get("accuracy"), "heldout_accuracy_after": after.get("accuracy"),
        "heldout_domains": {d: {"before": (v["before"] or {}).get("accuracy"), "after": (v["after"] or {}).get("accuracy")}
                            for d, v in heldout["domains"].items()},
        "samples_per_s": last.get("samples_per_s"), "epoch_time_s": last.get("epoch_time_s"),
        "metrics": storage.join(cfg.output, METRICS_FILE), "curves": curves,
        "heldout": storage.join(cfg.output, HELDOUT_FILE)}
    log(f"facemill train {state['run_id']}: {state['epoch']} epochs; held-out accuracy "
        f"{_fmt(before, 'accuracy')} -> {_fmt(after, 'accuracy')}; embedder {embedder_uri}")
    return summary


def _fmt(values: dict, key: str) -> str:
    if key not in values:
        return "n/a"
    return f"{values[key]:.4f} ± {values.get(key + '_std', 0.0):.4f}"


def _read_json(uri: str, storage_options: dict) -> dict | None:
    fs, path = storage.url_to_fs(uri, storage_options)
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except ValueError:
        return None


def _write_json(uri: str, value: dict, storage_options: dict) -> None:
    storage.put_atomic(uri, (json.dumps(value, indent=2, default=str) + "\n").encode(), storage_options)
