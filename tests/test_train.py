"""Fine-tuning: the data split, checkpoint refusal, and a real 2-worker Ray Train run resumed on 1 worker.

The Ray run uses tiny settings (P=4, K=3, 2 steps per epoch) on the ``prepared_lfw`` fixture (30 people x 6
images + 60 single-image people): 2 epochs on 2 gloo workers, then ``resume`` to 3 epochs on 1 worker.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import schemas as S
from workers.dataset import read_table
from workers.training.data import DataConfig, load_faces, plan_split, read_face_index, split_faces
from workers.training.checkpoint import (
    CHECKPOINT_FILE, RAY_DIR, RAY_RUN_NAME, checkpoints_in, load_checkpoint_state, save_checkpoint_state)
from workers.training.config import (
    CURVES_FILE, EMBEDDER_DIR, HELDOUT_FILE, METRICS_FILE, RUN_FILE, SPLIT_FILE, TrainConfig)
from workers.training.run import run_training
from workers.training.schedule import warmup_cosine
from workers.training.losses import LossConfig

pytestmark = pytest.mark.slow


def _faces_per_identity(root: Path) -> dict[str, int]:
    table = read_table(str(root), S.FACES, columns=[S.IDENTITY, S.FACE_INDEX]).to_pandas()
    return table[table[S.FACE_INDEX] == 0][S.IDENTITY].value_counts().to_dict()


# ------------------------------------------------------------------------------------------------------
# Data


def test_split_excludes_singles_and_pairs_identities(prepared_lfw, tmp_path):
    root, _ = prepared_lfw
    counts = _faces_per_identity(root)
    multi = sorted(name for name, n in counts.items() if n >= 2)
    singles = sorted(name for name, n in counts.items() if n < 2)
    assert len(multi) >= 20 and singles, counts
    # A pairs file (View 1 layout, one fold) naming two trainable people and one single.
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"1\n{multi[0]} 1 2\n{multi[1]} 1 {singles[0]} 1\n")
    cfg = DataConfig(faces=str(root), exclude_pairs=str(pairs), heldout_fraction=0.25, seed=3)

    split = plan_split(cfg)

    train, heldout = set(split.train), set(split.heldout)
    assert set(split.excluded) == {multi[0], multi[1], singles[0]}
    assert not (train | heldout) & set(split.excluded)
    assert not train & heldout
    assert all(counts[name] >= 2 for name in train)
    assert set(singles[1:]) <= heldout                      # singles never train, they are held out
    assert train | heldout == set(counts) - set(split.excluded)
    held_multi = [name for name in heldout if counts[name] >= 2]
    assert len(held_multi) == int(np.floor(0.25 * (len(multi) - 2) + 0.5))
    assert split.num_faces_train == sum(counts[name] for name in train)
    # Deterministic, and independent of the row order.
    assert split_faces(read_face_index(cfg).sample(frac=1.0, random_state=0), cfg,
                       set(split.excluded)) == split


def test_load_faces_decodes_one_face_per_image(prepared_lfw):
    root, _ = prepared_lfw
    cfg = DataConfig(faces=str(root))
    split = plan_split(cfg)
    faces = load_faces(cfg, split.train)
    assert faces.crops.dtype == np.uint8 and faces.crops.shape == (len(faces), 112, 112, 3)
    assert len(faces) == split.num_faces_train
    assert np.unique(faces.keys).size == len(faces)
    assert all(key.endswith("#0") for key in faces.keys)     # face_index 0 only
    assert set(np.bincount(faces.labels).tolist()) >= {6}     # 6 images per trainable person
    assert faces.identities == split.train
    all_faces = load_faces(DataConfig(faces=str(root), all_faces=True), split.train)
    assert len(all_faces) >= len(faces)


def test_data_config_rejects_bad_values():
    with pytest.raises(ValueError, match="heldout_fraction"):
        DataConfig(faces="x", heldout_fraction=1.0)
    with pytest.raises(ValueError, match="min_faces"):
        DataConfig(faces="x", min_faces=1)


# ------------------------------------------------------------------------------------------------------
# Checkpoints and schedule (no Ray)


def _tiny_state() -> dict:
    return {"epoch": 2, "backbone": {"w": torch.ones(3)}, "loss": {"centers": torch.zeros(2, 3)},
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"progress": 2.0}, "scaler": {},
            "sampler": {"seed": 0, "world_size": 2}, "identities": ["a", "b"], "run_id": "r1",
            "init": {"name": "sface"}, "heldout_before": None, "heldout_last": {"accuracy": 0.5},
            "probe_before": {"loss": 1.0}}


def test_checkpoint_round_trip(tmp_path):
    save_checkpoint_state(_tiny_state(), tmp_path)
    state = load_checkpoint_state(tmp_path)
    assert state["epoch"] == 2 and state["identities"] == ["a", "b"]
    assert torch.equal(state["backbone"]["w"], torch.ones(3))


def test_truncated_or_foreign_checkpoint_is_refused(tmp_path):
    good = tmp_path / "good"
    path = save_checkpoint_state(_tiny_state(), good)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / CHECKPOINT_FILE).write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint_state(truncated)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"model": torch.ones(2)}, foreign / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="not a facemill training checkpoint"):
        load_checkpoint_state(foreign)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"format": "facemill.train-checkpoint", "obj": Path("x")}, pickled / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="cannot read checkpoint"):   # weights_only refuses the object
        load_checkpoint_state(pickled)

    with pytest.raises(ValueError, match=f"no {CHECKPOINT_FILE}"):
        load_checkpoint_state(tmp_path / "empty")


def test_warmup_cosine_schedule():
    assert warmup_cosine(0.5, 10, 1, 0.01) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 10, 1, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(5.5, 10, 1, 0.01) == pytest.approx(0.505)
    assert warmup_cosine(10, 10, 1, 0.01) == pytest.approx(0.01)
    values = [warmup_cosine(p, 10, 1, 0.0) for p in np.linspace(1, 10, 19)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------------------------------------------
# A real Ray Train run


def _config(root: Path, output: Path, exclude_pairs: str | None = None, **overrides) -> TrainConfig:
    data = DataConfig(faces=str(root), exclude_pairs=exclude_pairs, heldout_fraction=0.2, seed=0)
    fields = dict(data=data, output=str(output),
                  loss=LossConfig(margin=0.2, mining="facenet"), workers=2, epochs=2, people_per_batch=4,
                  images_per_person=3, steps_per_epoch=2, lr=5e-4, head_lr_multiplier=20.0,
                  warmup_epochs=0.5, use_gpu="false", keep_checkpoints=3, heldout_pairs_per_fold=40,
                  heldout_degrade=("lowres:16",))
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ray_session, prepared_lfw):
    """2 epochs on 2 workers, then resumed to 3 epochs on 1 worker.

    A pairs file naming the single-image people excludes them (exercising --exclude-pairs, and keeping
    the held-out set at 6 people x 6 faces, cheap to embed every epoch).

    Returns:
        (output, first summary, second summary, metrics rows after the first run, seconds per run).
    """
    root, _ = prepared_lfw
    runs = tmp_path_factory.mktemp("runs")
    singles = sorted(name for name, n in _faces_per_identity(root).items() if n < 2)
    pairs = runs / "exclude_pairs.txt"
    pairs.write_text("".join(f"{a} 1 {b} 1\n" for a, b in zip(singles, singles[1:] + singles[:1])))
    output = runs / "ft1"
    t0 = time.perf_counter()
    first = run_training(_config(root, output, exclude_pairs=str(pairs)), log=lambda *_: None)
    t1 = time.perf_counter()
    first_metrics = _metrics(output)
    second = run_training(_config(root, output, exclude_pairs=str(pairs), workers=1, epochs=3, resume=True),
                          log=lambda *_: None)
    t2 = time.perf_counter()
    return output, first, second, first_metrics, {"first_s": t1 - t0, "second_s": t2 - t1}


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]


def test_training_lowers_the_loss_on_a_fixed_batch(trained_run):
    output, first, _, first_metrics, seconds = trained_run
    assert [row["epoch"] for row in first_metrics] == [0, 1, 2]
    before, after = first_metrics[0], first_metrics[-1]
    # The probe batch is fixed and evaluated in eval mode: a deterministic before/after comparison.
    assert after["probe_softmax"] < 0.8 * before["probe_softmax"], (before, after)
    assert after["probe_loss"] < before["probe_loss"], (before, after)
    for row in first_metrics[1:]:
        assert row["world_size"] == 2 and row["steps"] == 2
        assert row["samples"] == 2 * 2 * 4 * 3 and row["samples_per_s"] > 0
        for key in ("loss", "softmax", "center", "triplet", "num_triplets", "fraction_active", "lr",
                    "heldout_accuracy", "heldout_accuracy_std", "heldout_val", "heldout_lowres16_accuracy"):
            assert np.isfinite(row[key]), key
    # The held-out pairs are measured clean and in the 16 px domain from epoch 0 on; 16 px is harder.
    assert before["heldout_lowres16_accuracy"] <= before["heldout_accuracy"]
    print(f"\nfirst run (2 workers, 2 epochs x 2 steps, P=4 K=3): {seconds['first_s']:.1f}s, "
          f"epoch times {[row['epoch_time_s'] for row in first_metrics[1:]]}, "
          f"samples/s {[row['samples_per_s'] for row in first_metrics[1:]]}")


def test_checkpoints_and_resume_on_fewer_workers(trained_run):
    output, first, second, _, seconds = trained_run
    rows = _metrics(output)
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3]          # continued, not restarted at 0
    assert rows[-1]["world_size"] == 1 and rows[2]["world_size"] == 2
    assert checkpoints_in(str(output)) == ["epoch_0001", "epoch_0002", "epoch_0003"]
    state = load_checkpoint_state(output / RAY_DIR / RAY_RUN_NAME / "epoch_0003")
    assert state["epoch"] == 3 and state["sampler"]["world_size"] == 1
    assert state["run_id"] == first["run_id"] == second["run_id"]
    assert state["loss"]["center_loss.centers"].abs().sum() > 0
    assert state["scheduler"]["progress"] == pytest.approx(3.0)
    assert first["epochs"] == 2 and second["epochs"] == 3
    # The 2-worker checkpoint holds the full head: every identity's classifier row and AdamW moments, each from the
    # worker that held it (a missing worker's rows would be zeros).
    two = load_checkpoint_state(output / RAY_DIR / RAY_RUN_NAME / "epoch_0002")
    weight = two["loss"]["classifier.weight"]
    assert weight.shape[0] == len(two["identities"]) == state["loss"]["classifier.weight"].shape[0]
    moments = [v["exp_avg_sq"] for v in two["optimizer"]["state"].values() if v["exp_avg_sq"].shape == weight.shape]
    assert len(moments) == 1 and bool((moments[0].abs().sum(dim=1) > 0).all())
    assert bool((weight.abs().sum(dim=1) > 0).all())
    run = json.loads((output / RUN_FILE).read_text())
    assert run["run_id"] == first["run_id"] and run["summary"]["epochs"] == 3
    print(f"\nresumed run (1 worker, 1 epoch): {seconds['second_s']:.1f}s")


def test_reports_and_heldout_split(trained_run, prepared_lfw):
    output, _, second, _, _ = trained_run
    heldout = json.loads((output / HELDOUT_FILE).read_text())
    for when in ("before", "after"):
        assert 0.0 <= heldout[when]["accuracy"] <= 1.0
        assert heldout[when]["accuracy_std"] >= 0.0 and "val" in heldout[when] and "val_std" in heldout[when]
    assert heldout["epochs"] == 3
    assert (output / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert heldout["after"]["num_folds"] == 3 and heldout["after"]["num_pairs"] == 3 * 40
    assert heldout["domains"]["clean"]["after"] == heldout["after"]
    assert heldout["domains"]["lowres:16"]["after"]["num_pairs"] == 3 * 40
    assert set(second["heldout_domains"]) == {"clean", "lowres:16"}
    split = json.loads((output / SPLIT_FILE).read_text())
    counts = _faces_per_identity(prepared_lfw[0])
    assert set(split["excluded"]) == {name for name, n in counts.items() if n < 2}
    assert len(split["heldout"]) == 6 and len(split["train"]) == 24
    assert not set(split["heldout"]) & set(split["train"])
    assert second["heldout_accuracy_before"] == heldout["before"]["accuracy"]


def test_exported_embedder_loads_and_embeds(trained_run, prepared_lfw):
    from workers.faces.embedders import load_embedder

    output, first, second, _, _ = trained_run
    root, _ = prepared_lfw
    crops = load_faces(DataConfig(faces=str(root)), plan_split(DataConfig(faces=str(root))).heldout[:4]).crops
    embedder = load_embedder(str(output / EMBEDDER_DIR))
    assert embedder.spec.name == "sface-ft-ft1"
    assert first["run_id"] in embedder.spec.version and embedder.spec.version.endswith("-e3")
    embeddings = embedder.embed(crops)
    assert embeddings.shape == (len(crops), 128)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # The run folder itself loads too (embedder.json at its root points into embedder/).
    np.testing.assert_allclose(load_embedder(str(output)).embed(crops), embeddings, atol=1e-6)
    # And it differs from the starting weights.
    assert not np.allclose(load_embedder("sface").embed(crops), embeddings, atol=1e-3)


def test_resume_refuses_a_truncated_checkpoint(trained_run, prepared_lfw, tmp_path):
    output, *_ = trained_run
    root, _ = prepared_lfw
    pairs = str(output.parent / "exclude_pairs.txt")
    # Runs last in this module: corrupt the newest checkpoint, the driver refuses it before starting Ray Train.
    path = output / RAY_DIR / RAY_RUN_NAME / "epoch_0003" / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        run_training(_config(root, output, pairs, workers=1, epochs=4), log=lambda *_: None)
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        run_training(_config(root, tmp_path / "empty", resume=True), log=lambda *_: None)
