"""scripts/study_finetune.py end to end on a tiny subset: two half models trained by jobs.train (Ray Train),
each never trained on an identity of the folds it is tested on, then paired per-fold results per domain."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import schemas as S
from workers.dataset import read_table

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("study_finetune", ROOT / "scripts" / "study_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pairs_file(root: Path, path: Path) -> list[list[str]]:
    """A View-2-like pairs file over the fixture: 4 identity-disjoint folds of 4 people, 2 same + 2 different
    pairs each. Returns the people of each fold."""
    faces = read_table(str(root), S.FACES, columns=[S.IDENTITY, S.URI]).to_pandas()
    per = faces.groupby(S.IDENTITY)[S.URI].apply(lambda u: sorted({int(x.rsplit("_", 1)[1][:4]) for x in u}))
    people = sorted(n for n, images in per.items() if len(images) >= 4)[:16]
    folds = [people[i:i + 4] for i in range(0, 16, 4)]
    lines = ["4\t2"]
    for a, b, c, d in folds:
        lines += [f"{a}\t{per[a][0]}\t{per[a][1]}", f"{b}\t{per[b][0]}\t{per[b][1]}",
                  f"{c}\t{per[c][0]}\t{d}\t{per[d][0]}", f"{a}\t{per[a][2]}\t{c}\t{per[c][1]}"]
    path.write_text("\n".join(lines) + "\n")
    return folds


def test_study_trains_half_models_on_disjoint_identities(prepared_lfw, tmp_path):
    study = _study()
    root, _ = prepared_lfw
    folds = _pairs_file(root, tmp_path / "pairs.txt")
    train_args = ("--epochs 1 --steps-per-epoch 2 --people-per-batch 4 --images-per-person 3 --heldout-fraction 0 "
                  "--distill-weight 5 --freeze-bn --augment lowres=0.5")
    result = study.run(study.parse_args([
        "--dataset", str(root), "--pairs", str(tmp_path / "pairs.txt"), "--output", str(tmp_path / "out"),
        "--domains", "clean,lowres:16", "--train-args", train_args]))

    assert result["folds"] == 4 and result["num_pairs"] == 16 and len(result["models"]) == 2
    for model, tested in zip(result["models"], (folds[:2], folds[2:])):
        split = json.loads((tmp_path / "out" / f"model_half{model['half']}" / "split.json").read_text())
        tested_people = {p for fold in tested for p in fold}
        assert tested_people <= set(split["excluded"])            # never trained on what it is tested on
        assert not tested_people & set(split["train"])
        assert set(split["train"]) & {p for fold in folds for p in fold} - tested_people   # the other half is
    for domain in ("clean", "lowres:16"):
        acc = result["domains"][domain]["accuracy"]
        assert len(acc["base_folds"]) == len(acc["tuned_folds"]) == 4
        gains = np.subtract(acc["tuned_folds"], acc["base_folds"])
        assert acc["gain"] == pytest.approx(gains.mean(), abs=1e-3)
        assert acc["gain_se"] == pytest.approx(gains.std(ddof=1) / 2, abs=1e-3)
    assert set(result["bars"]) >= {"passes", "lowres16_passes", "clean_loss_points"}
    assert (tmp_path / "out" / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "study.json").read_text())["domains"].keys() == {"clean", "lowres:16"}
