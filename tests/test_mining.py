"""Triplet mining and triplet loss against brute-force loops over (a, p, n)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from workers.training.mining import pairwise_sq_distances, semi_hard_triplets, triplet_loss

MARGIN = 0.2
SEEDS = [0, 1, 2, 3, 4]


def _batch(seed: int, people: int = 6, images: int = 4, dim: int = 16, cluster: float = 0.8):
    """L2-normalised embeddings loosely clustered by identity, so that some anchor-positive
    pairs have FaceNet candidates and some have none."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(people).repeat_interleave(images)
    centers = cluster * torch.randn(people, dim, generator=g)
    emb = F.normalize(centers[labels] + torch.randn(people * images, dim, generator=g), dim=1)
    order = torch.randperm(people * images, generator=g)     # identities not contiguous
    return emb[order], labels[order]


def _pairs(labels):
    b = labels.numel()
    return [(a, p) for a, p in itertools.combinations(range(b), 2) if labels[a] == labels[p]]


def _brute_semi_hard(dist, labels, margin):
    out = set()
    for a, p in _pairs(labels):
        for n in range(labels.numel()):
            gap = dist[a, n] - dist[a, p]
            if labels[n] != labels[a] and 0 < gap < margin:
                out.add((a, p, n))
    return out


def _brute_facenet_candidates(dist, labels, margin):
    return {(a, p): {n for n in range(labels.numel())
                     if labels[n] != labels[a] and dist[a, n] - dist[a, p] < margin}
            for a, p in _pairs(labels)}


def _brute_batch_hard(dist, labels):
    out = set()
    b = labels.numel()
    for a in range(b):
        pos = [j for j in range(b) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(b) if labels[j] != labels[a]]
        if not pos or not neg:
            continue
        p = max(pos, key=lambda j: (dist[a, j].item(), -j))
        n = min(neg, key=lambda j: (dist[a, j].item(), j))
        out.add((a, p, n))
    return out


def _as_set(triplets):
    return set(zip(*(t.tolist() for t in triplets)))


def test_pairwise_sq_distances_matches_float64() -> None:
    emb, _ = _batch(0)
    ref = ((emb.double()[:, None] - emb.double()[None]) ** 2).sum(-1)
    dist = pairwise_sq_distances(emb)
    assert dist.shape == (24, 24) and dist.dtype == torch.float32
    torch.testing.assert_close(dist.double(), ref, atol=1e-5, rtol=0)
    assert (dist.diagonal() == 0).all() and (dist >= 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_semi_hard_equals_brute_force(seed: int) -> None:
    emb, labels = _batch(seed)
    dist = pairwise_sq_distances(emb)
    triplets = semi_hard_triplets(emb, labels, MARGIN, "semi_hard")
    assert all(t.dtype == torch.int64 for t in triplets)
    expected = _brute_semi_hard(dist, labels, MARGIN)
    assert expected, "test data should contain semi-hard triplets"
    assert len(triplets[0]) == len(expected)
    assert _as_set(triplets) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_hard_equals_brute_force(seed: int) -> None:
    emb, labels = _batch(seed)
    dist = pairwise_sq_distances(emb)
    triplets = semi_hard_triplets(emb, labels, MARGIN, "batch_hard")
    assert len(triplets[0]) == 24
    assert _as_set(triplets) == _brute_batch_hard(dist, labels)


@pytest.mark.parametrize("seed", SEEDS)
def test_facenet_picks_valid_candidates(seed: int) -> None:
    emb, labels = _batch(seed)
    dist = pairwise_sq_distances(emb)
    g = torch.Generator().manual_seed(seed)
    a, p, n = semi_hard_triplets(emb, labels, MARGIN, "facenet", generator=g)
    candidates = _brute_facenet_candidates(dist, labels, MARGIN)
    with_candidates = {pair for pair, negs in candidates.items() if negs}
    assert with_candidates and len(with_candidates) < len(candidates)
    picked = list(zip(a.tolist(), p.tolist(), n.tolist()))
    assert {(x, y) for x, y, _ in picked} == with_candidates
    assert len(picked) == len(with_candidates)              # one triplet per pair
    assert all(z in candidates[(x, y)] for x, y, z in picked)

    again = semi_hard_triplets(emb, labels, MARGIN, "facenet",
                               generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(u, v) for u, v in zip((a, p, n), again))


def test_facenet_pick_is_spread_over_candidates() -> None:
    emb, labels = _batch(0)
    dist = pairwise_sq_distances(emb)
    candidates = _brute_facenet_candidates(dist, labels, 2.0)   # wide margin: many candidates
    g = torch.Generator().manual_seed(0)
    picks: dict[tuple[int, int], set[int]] = {}
    for _ in range(50):
        a, p, n = semi_hard_triplets(emb, labels, 2.0, "facenet", generator=g)
        for x, y, z in zip(a.tolist(), p.tolist(), n.tolist()):
            picks.setdefault((x, y), set()).add(z)
    pair, negs = max(candidates.items(), key=lambda kv: len(kv[1]))
    assert len(negs) >= 10 and len(picks[pair]) >= 0.6 * len(negs)
    assert picks[pair] <= negs


def test_chunked_mining_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.training.mining as mining

    emb, labels = _batch(3)
    whole = semi_hard_triplets(emb, labels, MARGIN, "semi_hard")
    fn_whole = semi_hard_triplets(emb, labels, MARGIN, "facenet",
                                  generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(mining, "_MAX_MASK_ELEMENTS", 24 * 5)   # 5 pairs per chunk
    chunked = semi_hard_triplets(emb, labels, MARGIN, "semi_hard")
    fn_chunked = semi_hard_triplets(emb, labels, MARGIN, "facenet",
                                    generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(u, v) for u, v in zip(whole, chunked))
    assert all(torch.equal(u, v) for u, v in zip(fn_whole, fn_chunked))


def test_no_pairs_gives_empty_triplets() -> None:
    emb, _ = _batch(0, people=4, images=1)
    for mode in ("facenet", "semi_hard", "batch_hard"):
        a, p, n = semi_hard_triplets(emb, torch.arange(4), MARGIN, mode)
        assert a.shape == p.shape == n.shape == (0,) and a.dtype == torch.int64


def test_mining_errors() -> None:
    emb, labels = _batch(0)
    with pytest.raises(ValueError, match="'nope'"):
        semi_hard_triplets(emb, labels, MARGIN, "nope")
    with pytest.raises(ValueError, match=r"\[24\].*\(23,\)"):
        semi_hard_triplets(emb, labels[:-1], MARGIN)
    with pytest.raises(ValueError, match="-0.1"):
        semi_hard_triplets(emb, labels, -0.1)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_triplet_loss_matches_float64(seed: int) -> None:
    emb, labels = _batch(seed)
    emb.requires_grad_(True)
    a, p, n = semi_hard_triplets(emb, labels, 0.5, "facenet",
                                 generator=torch.Generator().manual_seed(seed))
    loss, stats = triplet_loss(emb, a, p, n, 0.5)
    e = emb.detach().double()
    per = [max(((e[x] - e[y]) ** 2).sum().item() - ((e[x] - e[z]) ** 2).sum().item() + 0.5, 0.0)
           for x, y, z in zip(a.tolist(), p.tolist(), n.tolist())]
    assert stats["num_triplets"] == len(per) > 0
    assert loss.item() == pytest.approx(sum(per) / len(per), abs=1e-6)
    assert stats["fraction_active"] == pytest.approx(sum(v > 0 for v in per) / len(per))
    assert 0 < stats["fraction_active"] <= 1
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_triplet_loss_zero_triplets_keeps_graph() -> None:
    emb, _ = _batch(0)
    emb.requires_grad_(True)
    empty = torch.empty(0, dtype=torch.int64)
    loss, stats = triplet_loss(emb, empty, empty, empty, MARGIN)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    assert stats == {"num_triplets": 0, "fraction_active": 0.0}
    loss.backward()
    assert emb.grad is not None and (emb.grad == 0).all()


def test_triplet_loss_shape_error() -> None:
    emb, _ = _batch(0)
    with pytest.raises(ValueError, match=r"\(2,\), \(2,\), \(1,\)"):
        triplet_loss(emb, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3]), MARGIN)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mining_on_cuda_matches_cpu() -> None:
    emb, labels = _batch(1)
    for mode in ("semi_hard", "batch_hard"):
        cpu = semi_hard_triplets(emb, labels, MARGIN, mode)
        gpu = semi_hard_triplets(emb.cuda(), labels.cuda(), MARGIN, mode)
        assert all(t.device.type == "cuda" for t in gpu)
        assert _as_set(cpu) == _as_set(gpu)
    g = torch.Generator().manual_seed(0)
    a, p, n = semi_hard_triplets(emb.cuda(), labels.cuda(), MARGIN, "facenet", generator=g)
    assert a.device.type == "cuda" and a.numel() > 0
