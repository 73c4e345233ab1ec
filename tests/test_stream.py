"""The training data path: identity shards, each worker's share held as JPEG bytes, batches decoded ahead.

Plain pytest on a tiny Delta dataset built here (real JPEG crops, three commits, faces without an identity
and second faces of an image); one test measures the bytes held per face on the ``prepared_lfw`` fixture.
"""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import schemas as S
from workers import dataset, records
from workers.training import data as data_module
from workers.training.augment import AugmentConfig, augment_batch
from workers.training.data import DataConfig, EncodedFaces, load_encoded_faces, load_faces, plan_split
from workers.training.sampler import PKSampler, shard_identities, shard_seed, shard_steps
from workers.training.stream import (
    decode_jpegs, make_batch, open_worker_shard, plan_shards, prefetch_batches, probe_batch, probe_identities)
from tests.conftest import LFW_IMAGES, lfw_people

DECODED_BYTES = 112 * 112 * 3
#: Faces of the training identities of the tiny dataset (id13 has 1 face: held out, never trained).
COUNTS = {f"id{i:02d}": n for i, n in enumerate([2, 3, 4, 5, 6, 7, 2, 9, 3, 4, 12, 2, 5, 1])}


def _jpeg(rng: np.random.Generator) -> bytes:
    """A 112 x 112 face-like JPEG (smooth blobs plus noise, quality 95 as prepare stores them)."""
    low = rng.integers(0, 256, (7, 7, 3)).astype(np.uint8)
    image = cv2.resize(low, (112, 112), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _shard_rows(uris: list[str], identities: list, faces: list[int], shard: str,
                rng: np.random.Generator, crops: list[bytes] | None = None) -> pa.Table:
    n, f = len(uris), int(sum(faces))
    images = records.images_table(
        shard=shard, uris=uris, identities=identities, fingerprints=[f"fp-{u}" for u in uris],
        widths=np.full(n, 250), heights=np.full(n, 250), errors=[None] * n, details=[None] * n,
        num_faces=np.asarray(faces), settings="s", run_id="r")
    emb = rng.normal(size=(f, S.EMBEDDING_DIM)).astype(np.float32)
    face_rows = records.faces_table(
        shard=shard, uris=uris, identities=identities, image_index=np.repeat(np.arange(n), faces),
        boxes=rng.uniform(0, 100, (f, 4)), scores=np.full(f, 0.99), landmarks=rng.uniform(0, 100, (f, 5, 2)),
        crops=crops if crops is not None else [_jpeg(rng) for _ in range(f)],
        embeddings=emb / np.linalg.norm(emb, axis=1, keepdims=True),
        embedder="sface", embedder_version="1", run_id="r")
    return records.records_table(images, face_rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[DataConfig, object]:
    """A dataset of COUNTS faces (face_index 0), plus 3 second faces and 4 faces without an identity,
    committed as 3 shards; every multi-face identity trains (heldout_fraction 0)."""
    root = str(tmp_path_factory.mktemp("stream") / "ds")
    dataset.create_dataset(root, S.EMBEDDING_DIM)
    rng = np.random.default_rng(0)
    uris, identities = [], []
    for name, n in COUNTS.items():
        uris += [f"/in/{name}/{j}.jpg" for j in range(n)]
        identities += [name] * n
    uris += [f"/in/unnamed/{j}.jpg" for j in range(4)]
    identities += [None] * 4
    faces = [1] * len(uris)
    for j in (0, 5, 20):
        faces[j] = 2                   # second faces: face_index 1, not used unless all_faces
    order = rng.permutation(len(uris))
    for shard, part in enumerate(np.array_split(order, 3)):
        dataset.commit_records(root, _shard_rows([uris[i] for i in part], [identities[i] for i in part],
                                                 [faces[i] for i in part], f"s{shard}", rng))
    cfg = DataConfig(faces=root, heldout_fraction=0.0, seed=5)
    return cfg, plan_split(cfg)


def _stored(cfg: DataConfig):
    """All face rows of the table (pandas), to compute expectations independently of the reader."""
    frame = dataset.read_table(cfg.faces, S.FACES).to_pandas()
    return frame[(frame[S.FACE_INDEX] == 0) & frame[S.IDENTITY].notna()]


# ------------------------------------------------------------------------------------------------------
# Shards (pure)


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 8])
def test_shards_are_disjoint_cover_every_identity_deterministic_and_balanced(workers):
    rng = np.random.default_rng(workers)
    for counts in (rng.zipf(1.6, 300).clip(2, 600),          # heavy-tailed, like LFW
                   np.full(37, 6),                           # all equal: ties broken by the seed
                   np.r_[500, np.full(40, 3)]):              # one identity larger than all the others
        owner = shard_identities(counts, workers, seed=3)
        assert owner.dtype == np.int64 and owner.shape == counts.shape
        assert owner.min() >= 0 and owner.max() < workers
        shards = [set(np.flatnonzero(owner == w).tolist()) for w in range(workers)]
        assert set().union(*shards) == set(range(counts.size))                   # every identity ...
        assert sum(len(s) for s in shards) == counts.size                        # ... in exactly one shard
        np.testing.assert_array_equal(shard_identities(counts, workers, seed=3), owner)
        loads = np.bincount(owner, weights=counts, minlength=workers)
        assert loads.max() - loads.min() <= counts.max(), (loads, counts.max())
        if workers > 1 and counts.size == 300:             # the forced cases have one answer
            assert not np.array_equal(shard_identities(counts, workers, seed=4), owner)


def test_shard_seeds_and_steps():
    seeds = [shard_seed(7, r) for r in range(4)]
    assert len(set(seeds)) == 4 and all(s >= 0 for s in seeds) and seeds == [shard_seed(7, r) for r in range(4)]
    counts = np.array([2, 2, 2, 2, 2, 5, 1])                 # the last is ineligible (1 face)
    owner = np.array([0, 0, 0, 1, 1, 1, 1])
    assert shard_steps(counts, owner, 2, 1) == 3              # worker 1: 3 eligible identities
    assert shard_steps(counts, owner, 2, 1, cap=2) == 2
    assert shard_steps(counts, owner, 2, 3) == 1
    with pytest.raises(ValueError, match=r"worker 0 of 2 holds 3 .*people_per_batch = 4.*\[3, 3\]"):
        shard_steps(counts, owner, 2, 4)
    with pytest.raises(ValueError, match="worker 2 of 3 holds 0"):
        shard_steps(counts, owner, 3, 1)
    with pytest.raises(ValueError, match="non-negative integers"):
        shard_identities(np.array([1.5, 2.0]), 2)


# ------------------------------------------------------------------------------------------------------
# What a worker holds


def test_split_counts_the_faces_of_each_training_identity(tiny):
    cfg, split = tiny
    assert split.train == tuple(sorted(n for n, c in COUNTS.items() if c >= 2))
    assert split.train_counts == tuple(COUNTS[n] for n in split.train)
    assert split.heldout == ("id13",)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_worker_holds_its_share_as_jpeg_bytes_and_reads_only_its_rows(tiny, monkeypatch, workers):
    cfg, split = tiny
    stored = _stored(cfg)
    reads = []
    real_scan = data_module.scan_faces

    def spy(cfg_, names, columns, *args, **kwargs):
        rows = 0
        for batch in real_scan(cfg_, names, columns, *args, **kwargs):
            rows += batch.num_rows
            yield batch
        reads.append((columns, sorted(names), rows))

    monkeypatch.setattr(data_module, "scan_faces", spy)
    owner, steps = plan_shards(split, workers, 2, cfg.seed)
    seen = []
    for rank in range(workers):
        reads.clear()
        shard = open_worker_shard(cfg, split, workers, rank, 2, 3)
        names = {split.train[i] for i in shard.identities}
        mine = stored[stored[S.IDENTITY].isin(names)].sort_values(S.IMAGE_ID)
        faces = shard.faces
        # Only this worker's rows were read: 4 columns, its identities pushed down, no row of another shard.
        assert reads == [([S.IMAGE_ID, S.IDENTITY, S.FACE_INDEX, S.CROP], sorted(names), len(mine))]
        # The bytes held are exactly the stored JPEG crops of its identities' faces ...
        assert len(faces) == len(mine) == sum(split.train_counts[i] for i in shard.identities)
        assert faces.crop_bytes == int(mine[S.CROP].map(len).sum())
        assert [faces.crop(i).tobytes() for i in range(len(faces))] == list(mine[S.CROP])  # sorted by image_id
        np.testing.assert_array_equal(np.asarray(split.train)[faces.labels], mine[S.IDENTITY].to_numpy())
        assert set(faces.labels.tolist()) == set(shard.identities.tolist())
        # ... and nothing decoded: one byte buffer of exactly those bytes, 24 bytes per face besides.
        arrays = {k: v for k, v in vars(faces).items() if isinstance(v, np.ndarray)}
        assert sorted(arrays) == ["data", "labels", "spans"]
        assert faces.data.shape == (faces.crop_bytes,) and faces.labels.shape == (len(faces),)
        assert faces.nbytes == faces.crop_bytes + 24 * len(faces)
        assert faces.nbytes < 0.5 * DECODED_BYTES * len(faces)
        assert shard.steps_per_epoch == steps and shard.sampler.seed == shard_seed(cfg.seed, rank)
        seen.append(set(names))
    assert set().union(*seen) == set(split.train) and sum(map(len, seen)) == len(split.train)


def test_encoded_faces_decode_to_load_faces(tiny):
    cfg, split = tiny
    for all_faces in (False, True):
        c = DataConfig(faces=cfg.faces, heldout_fraction=0.0, seed=cfg.seed, all_faces=all_faces)
        encoded, decoded = load_encoded_faces(c, split.train), load_faces(c, split.train)
        np.testing.assert_array_equal(encoded.labels, decoded.labels)
        np.testing.assert_array_equal(decode_jpegs(encoded.take(np.arange(len(encoded)))), decoded.crops)
        assert len(encoded) == split.num_faces_train + (3 if all_faces else 0)
    some = load_encoded_faces(cfg, split.train, [4, 1])
    assert set(some.labels.tolist()) == {1, 4} and len(some) == split.train_counts[1] + split.train_counts[4]
    assert len(load_encoded_faces(cfg, split.train, [])) == 0
    for nobody in (load_faces(cfg, ("nobody",)), load_faces(DataConfig(faces=cfg.faces + "-absent"), ("id00",))):
        assert len(nobody) == 0 and nobody.crops.shape[0] == 0 and nobody.labels.shape == (0,)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 13\)"):
        load_encoded_faces(cfg, split.train, [13])


def _lfw_crop(path) -> bytes:
    """A 112 x 112 JPEG (quality 95, as prepare stores crops) of the centre of a real LFW image."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)[69:181, 69:181]
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _unpacked_reference(cfg: DataConfig, identities: tuple[str, ...], labels) -> tuple[list[bytes], np.ndarray]:
    """The representation before the packed buffer: the whole filtered table, one Python bytes per face,
    sorted by image_id then face_index (what load_encoded_faces returned until it packed the crops)."""
    names = [identities[i] for i in labels]
    where = pc.field(S.IDENTITY).isin(names)
    if not cfg.all_faces:
        where = where & (pc.field(S.FACE_INDEX) == 0)
    table = dataset.read_table(cfg.faces, S.FACES, columns=[S.IMAGE_ID, S.IDENTITY, S.FACE_INDEX, S.CROP],
                               filter=where)
    table = table.take(pc.sort_indices(table, sort_keys=[(S.IMAGE_ID, "ascending"), (S.FACE_INDEX, "ascending")]))
    label_of = {name: i for i, name in enumerate(identities)}
    return table.column(S.CROP).to_pylist(), np.array([label_of[n] for n in table.column(S.IDENTITY).to_pylist()])


def test_packed_crops_are_the_crops_of_the_unpacked_reader_on_real_lfw_faces(lfw_dir, tmp_path):
    """Real LFW crops in 3 commits (rows shuffled, second faces): the packed buffer + spans give, face for face,
    the bytes, labels and order of the old one-bytes-object-per-face reader, and the same decoded batches."""
    rng = np.random.default_rng(3)
    people = lfw_people(4, 8, seed=3)
    paths = [p for name in people for p in sorted((LFW_IMAGES / name).glob("*.jpg"))[:5]]
    uris = [str(p) for p in paths]
    identities = [p.parent.name for p in paths]
    faces = [2 if j % 7 == 0 else 1 for j in range(len(paths))]        # some images with a second face
    crops = [_lfw_crop(p) for p in paths]
    root = str(tmp_path / "ds")
    dataset.create_dataset(root, S.EMBEDDING_DIM)
    for shard, part in enumerate(np.array_split(rng.permutation(len(paths)), 3)):
        part_crops = [c for i in part for c in [crops[i]] + [crops[(i + 1) % len(crops)]] * (faces[i] - 1)]
        dataset.commit_records(root, _shard_rows([uris[i] for i in part], [identities[i] for i in part],
                                                 [faces[i] for i in part], f"s{shard}", rng, part_crops))
    for all_faces in (False, True):
        cfg = DataConfig(faces=root, heldout_fraction=0.0, seed=1, all_faces=all_faces)
        split = plan_split(cfg)
        for labels in (np.arange(len(split.train)), np.array([5, 0, 3])):
            packed = load_encoded_faces(cfg, split.train, labels)
            want, want_labels = _unpacked_reference(cfg, split.train, labels)
            assert len(packed) == len(want) > 0
            assert [packed.crop(i).tobytes() for i in range(len(packed))] == want
            np.testing.assert_array_equal(packed.labels, want_labels)
            assert packed.data.nbytes == packed.crop_bytes == sum(map(len, want))
            index = rng.permutation(len(packed))[:9]
            np.testing.assert_array_equal(decode_jpegs(packed.take(index)), decode_jpegs([want[i] for i in index]))
    # The same batches as from the unpacked bytes, step by step.
    cfg = DataConfig(faces=root, heldout_fraction=0.0, seed=1)
    split = plan_split(cfg)
    shard = open_worker_shard(cfg, split, 2, 1, 2, 2)
    want, _ = _unpacked_reference(cfg, split.train, shard.identities)
    unpacked = EncodedFaces.from_crops(want, shard.faces.labels, split.train)
    for step in range(shard.steps_per_epoch):
        a, b = make_batch(shard.faces, shard.sampler, 1, step), make_batch(unpacked, shard.sampler, 1, step)
        np.testing.assert_array_equal(a.crops, b.crops)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_encoded_faces_from_crops_and_checks():
    faces = EncodedFaces.from_crops([b"ab", b"", b"cde"], [1, 0, 1], ("x", "y"))
    assert [faces.crop(i).tobytes() for i in range(3)] == [b"ab", b"", b"cde"]
    assert [v.tobytes() for v in faces.take([2, 0])] == [b"cde", b"ab"]
    assert faces.crop_bytes == 5 and faces.nbytes == 5 + 24 * 3 and len(EncodedFaces.from_crops([], [], ())) == 0
    with pytest.raises(ValueError, match=r"spans must be int64\[3, 2\]"):
        EncodedFaces(data=faces.data, spans=faces.spans[:2], labels=faces.labels, identities=faces.identities)
    with pytest.raises(ValueError, match=r"spans must lie in \[0, 5\]"):
        EncodedFaces(data=faces.data, spans=faces.spans + 1, labels=faces.labels, identities=faces.identities)


# ------------------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("threads,depth", [(1, 1), (2, 3), (3, 2), (4, 8)])
def test_prefetcher_yields_the_sampler_batches_in_order_decoded(tiny, threads, depth):
    cfg, split = tiny
    shard = open_worker_shard(cfg, split, 2, 1, 2, 3)
    sampler, faces = shard.sampler, shard.faces
    augment = AugmentConfig(jpeg=0.5, gray=0.5, mask=0.3)

    def transform(crops, epoch, step):
        return augment_batch(crops, augment, cfg.seed, epoch, step, 1)

    for epoch in (0, 3):
        for fn in (None, transform):
            got = list(prefetch_batches(faces, sampler, epoch, sampler.steps_per_epoch, threads=threads,
                                        depth=depth, transform=fn))
            assert [b.step for b in got] == list(range(sampler.steps_per_epoch))
            for step, batch in enumerate(got):
                index = sampler.indices_for_step(epoch, step)
                np.testing.assert_array_equal(batch.index, index)
                want = records.decode_crops(pa.array([faces.crop(i).tobytes() for i in index], pa.binary()))
                if fn is not None:
                    want = augment_batch(want, augment, cfg.seed, epoch, step, 1)
                assert batch.crops.dtype == np.uint8 and batch.crops.shape == (6, 112, 112, 3)
                np.testing.assert_array_equal(batch.crops, want)
                np.testing.assert_array_equal(batch.labels, faces.labels[index])
    assert list(prefetch_batches(faces, sampler, 0, 0)) == []
    with pytest.raises(ValueError, match="steps must be in"):
        next(prefetch_batches(faces, sampler, 0, sampler.steps_per_epoch + 1))


def test_prefetcher_runs_at_most_depth_batches_ahead_and_stops_when_closed(tiny):
    cfg, split = tiny
    shard = open_worker_shard(cfg, split, 1, 0, 2, 2)
    assert shard.steps_per_epoch == 6
    started, lock = [], threading.Lock()

    def transform(crops, epoch, step):
        with lock:
            started.append(step)
        return crops

    batches = prefetch_batches(shard.faces, shard.sampler, 0, 6, threads=4, depth=2, transform=transform)
    assert next(batches).step == 0
    time.sleep(0.3)                       # the threads have had all the time they need
    assert sorted(started) == [0, 1, 2]   # the batch held + 2 ahead, not more
    batches.close()
    time.sleep(0.1)
    assert sorted(started) == [0, 1, 2]


def test_a_corrupt_crop_is_named():
    faces = EncodedFaces.from_crops([_jpeg(np.random.default_rng(1)), b"not a jpeg"] * 2, [0, 0, 1, 1], ("a", "b"))
    sampler = PKSampler(faces.labels, 2, 2)
    with pytest.raises(ValueError, match=r"crop \d of the batch \(10 bytes\) is not a decodable image"):
        list(prefetch_batches(faces, sampler, 0, 1))
    with pytest.raises(ValueError, match="crop 1 of the batch is"):
        decode_jpegs([_jpeg(np.random.default_rng(1)),
                      cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()])


@pytest.mark.parametrize("workers", [2, 3])
def test_identities_of_a_step_are_disjoint_across_workers(tiny, workers):
    cfg, split = tiny
    p, k = 2, 3
    shards = [open_worker_shard(cfg, split, workers, r, p, k, steps_cap=0) for r in range(workers)]
    steps = {s.steps_per_epoch for s in shards}
    assert len(steps) == 1                                       # DDP: every worker takes the same steps
    steps = steps.pop()
    assert steps == min(s.sampler.steps_per_epoch for s in shards) >= 1
    for epoch in range(3):
        for step in range(steps):
            people = []
            for s in shards:
                batch = make_batch(s.faces, s.sampler, epoch, step)
                ids = batch.labels.reshape(p, k)
                assert (ids == ids[:, :1]).all() and np.unique(ids[:, 0]).size == p
                assert set(ids[:, 0].tolist()) <= set(s.identities.tolist())
                people.append(set(ids[:, 0].tolist()))
            assert sum(map(len, people)) == len(set().union(*people)) == workers * p
    # Resuming on another W gives other shards and batches, over the same global labels.
    one = open_worker_shard(cfg, split, 1, 0, p, k)
    assert one.steps_per_epoch == len(split.train) // p and len(one.faces) == split.num_faces_train


def test_probe_is_what_the_chief_trains_first_and_does_not_depend_on_workers(tiny):
    cfg, split = tiny
    chief = open_worker_shard(cfg, split, 3, 0, 2, 3)
    identities = probe_identities(chief)
    first = make_batch(chief.faces, chief.sampler, 0, 0)
    np.testing.assert_array_equal(identities, np.unique(first.labels))
    crops, labels = probe_batch(cfg, split, identities, 3)
    again, labels_again = probe_batch(cfg, split, identities.tolist()[::-1], 3)   # resumed with W = 1: the same
    np.testing.assert_array_equal(crops, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert crops.shape == (6, 112, 112, 3) and set(labels.tolist()) == set(identities.tolist())
    faces = load_faces(cfg, split.train)
    for crop, label in zip(crops, labels):                       # each crop is a face of its identity
        assert any(np.array_equal(crop, c) for c in faces.crops[faces.labels == label])
    with pytest.raises(ValueError, match="probe identities must be labels"):
        probe_batch(cfg, split, [len(split.train)], 3)


# ------------------------------------------------------------------------------------------------------
# Real crops


@pytest.mark.slow
def test_bytes_held_per_face_on_prepared_lfw(prepared_lfw):
    root, _ = prepared_lfw
    cfg = DataConfig(faces=str(root), heldout_fraction=0.2, seed=0)
    split = plan_split(cfg)
    shards = [open_worker_shard(cfg, split, 2, r, 4, 3) for r in range(2)]
    faces = sum(len(s.faces) for s in shards)
    held = sum(s.faces.nbytes for s in shards)
    assert faces == split.num_faces_train
    assert held / faces < DECODED_BYTES / 4
    print(f"\nLFW subset, 2 workers: {faces} training faces, {held / faces:.0f} bytes held per face "
          f"(JPEG {sum(s.faces.crop_bytes for s in shards) / faces:.0f}), decoded would be {DECODED_BYTES}")


def test_the_crop_column_is_read_only_from_row_groups_that_hold_a_wanted_face(tiny, tmp_path):
    """scan_faces reads the filter's small columns first and the wide crop column only where a wanted face is:
    here the crop column chunk of every other file is overwritten with garbage, so reading it at all fails."""
    import shutil

    import pyarrow.parquet as pq

    cfg, _ = tiny
    root = tmp_path / "ds"
    shutil.copytree(cfg.faces, root)
    copy = DataConfig(faces=str(root), heldout_fraction=0.0, seed=5)
    files = sorted((root / S.RECORDS).glob("*.parquet"))
    held = {f: set(pq.read_table(f, columns=[S.IDENTITY]).column(S.IDENTITY).drop_null().to_pylist()) for f in files}
    # An identity held by exactly one file, inside every other file's identity range (no statistics pruning).
    name = next(n for n in sorted(COUNTS) if COUNTS[n] > 1 and sum(n in h for h in held.values()) == 1
                and all(min(h) < n < max(h) for h in held.values() if n not in h))
    others = [f for f in files if name not in held[f]]
    for path in others:
        meta = pq.ParquetFile(path).metadata
        for group in range(meta.num_row_groups):
            row_group = meta.row_group(group)
            chunk = next(row_group.column(i) for i in range(row_group.num_columns)
                         if row_group.column(i).path_in_schema == S.CROP)
            start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
            with open(path, "r+b") as out:
                out.seek(start)
                out.write(b"\xff" * chunk.total_compressed_size)
    with pytest.raises(Exception):   # the premise: reading those crops at all fails
        dataset.read_table(str(root), S.FACES, columns=[S.IDENTITY, S.CROP])
    got = load_encoded_faces(copy, (name,))
    want = _stored(cfg)
    want = want[want[S.IDENTITY] == name].sort_values(S.IMAGE_ID)
    assert len(got) == COUNTS[name] == len(want)
    assert [got.crop(i).tobytes() for i in range(len(got))] == list(want[S.CROP])
