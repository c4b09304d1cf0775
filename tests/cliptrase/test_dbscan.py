"""cliptrase.dbscan against scikit-learn: the same label arrays, not merely the same partition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.cluster import DBSCAN
from sklearn.datasets import make_blobs
from sklearn.neighbors import NearestNeighbors

from cliptrase.dbscan import banded_neighbours, dbscan, k_distance_knee, pairwise_sq_distances
from cliptrase.launches import count_dispatch, device_branches

from . import refine_reference


def reference_knee(correlation: np.ndarray, min_samples: int) -> float:
    """The numpy/scikit-learn k-distance knee the torch version replaces."""
    return refine_reference.k_distance_knee(correlation, min_samples)


def sklearn_labels(x: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    return DBSCAN(eps=eps, min_samples=min_samples).fit_predict(x)


def torch_labels(x: np.ndarray, eps, min_samples: int) -> np.ndarray:
    return dbscan(torch.from_numpy(x), eps, min_samples).numpy()


def assert_same_labels(x: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    return assert_same_fit(x, eps, min_samples)[0]


def assert_same_fit(x: np.ndarray, eps: float, min_samples: int) -> tuple[np.ndarray, int]:
    """sklearn's labels (asserted equal to ours) and how many border points they have."""
    model = DBSCAN(eps=eps, min_samples=min_samples).fit(x)
    expected = model.labels_
    got = torch_labels(x, eps, min_samples)
    assert got.dtype == np.int64
    assert np.array_equal(got, expected), (
        f"{int((got != expected).sum())} of {len(x)} labels differ (eps={eps}, "
        f"min_samples={min_samples}, shape={x.shape})"
    )
    core = np.zeros(len(x), dtype=bool)
    core[model.core_sample_indices_] = True
    return expected, int(((expected >= 0) & ~core).sum())


def correlation_like(rng: np.random.Generator, n: int, groups: int, noise: float) -> np.ndarray:
    """An R-like matrix: clipped correlation of unit vectors drawn around planted groups."""
    centres = rng.normal(size=(groups, 48))
    v = centres[rng.integers(0, groups, n)] + noise * rng.normal(size=(n, 48))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return np.clip(v @ v.T, 0.0, None).astype(np.float32)


# ------------------------------------------------------------------------ distances


def test_pairwise_sq_distances_follow_sklearns_float64_expansion():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 50, 40)) * rng.uniform(0.1, 10, size=(3, 1, 1))).astype(np.float32)
    got = pairwise_sq_distances(torch.from_numpy(x))
    assert got.dtype == torch.float64 and got.shape == (3, 50, 50)
    x64 = x.astype(np.float64)
    sq = (x64 * x64).sum(-1)
    expected = np.maximum((sq[:, :, None] + (-2 * x64 @ x64.transpose(0, 2, 1))) + sq[:, None], 0)
    scale = sq.max()
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-13 * scale)
    # And what sklearn's brute-force kneighbors reports, squared (float32-rounded there).
    dist, idx = NearestNeighbors(n_neighbors=50, algorithm="brute").fit(x[0]).kneighbors(x[0])
    mine = np.take_along_axis(got[0].numpy(), idx, axis=1)
    np.testing.assert_allclose(np.sqrt(mine), dist, rtol=2e-7, atol=1e-6)


def test_pairwise_sq_distances_are_exact_on_integer_coordinates():
    rng = np.random.default_rng(1)
    x = rng.integers(-5, 6, size=(2, 30, 20)).astype(np.float32)
    exact = ((x[:, :, None].astype(np.int64) - x[:, None].astype(np.int64)) ** 2).sum(-1)
    assert np.array_equal(pairwise_sq_distances(torch.from_numpy(x)).numpy(), exact)


# ------------------------------------------------------------------ random data sets


@pytest.mark.parametrize("d", [2, 5, 20, 64])
def test_labels_equal_sklearn_on_blobs_of_varying_spread_with_border_points(d):
    borders = 0
    for seed in range(5):
        rng = np.random.default_rng(100 * d + seed)
        x, _ = make_blobs(
            n_samples=int(rng.integers(60, 260)),
            n_features=d,
            centers=int(rng.integers(1, 6)),
            cluster_std=float(rng.uniform(0.3, 3.0)),
            random_state=seed,
        )
        x = x.astype(np.float32)
        min_samples = int(rng.integers(2, 12))
        eps = reference_knee(x, min_samples) * float(rng.uniform(0.5, 1.5))
        borders += assert_same_fit(x, eps, min_samples)[1]
    assert borders > 5  # the border rule was exercised, not only cores and noise


@pytest.mark.parametrize("d", [2, 30])
def test_labels_equal_sklearn_on_uniform_noise(d):
    for seed in range(4):
        rng = np.random.default_rng(7 + seed + d)
        x = rng.uniform(0, 1, size=(int(rng.integers(50, 300)), d)).astype(np.float32)
        min_samples = int(rng.integers(2, 9))
        eps = reference_knee(x, min_samples) * float(rng.uniform(0.7, 1.3))
        assert_same_labels(x, eps, min_samples)


@pytest.mark.parametrize("n,min_samples", [(196, 3), (441, 7), (300, 12)])
def test_labels_equal_sklearn_on_correlation_like_rows(n, min_samples):
    clusters = borders = 0
    for seed in range(2):
        rng = np.random.default_rng(seed + n)
        r = correlation_like(rng, n, int(rng.integers(2, 9)), noise=float(rng.uniform(0.6, 1.6)))
        knee = reference_knee(r, min_samples)
        for eps in (knee, knee * 0.85, knee * 1.15):
            labels, border = assert_same_fit(r, float(eps), min_samples)
            clusters += int(labels.max()) + 1
            borders += border
    assert clusters > 6 and borders > 0  # not all noise, not one blob


def test_float64_rows_equal_sklearn_too():
    # float64 rows: eps squared and distances square-rooted in float64, no float32 rounding.
    rng = np.random.default_rng(5)
    r = correlation_like(rng, 300, groups=5, noise=1.0).astype(np.float64)
    eps = assert_same_knee(r, 5)  # kneighbors distances stay float64 here
    assert_same_labels(r, eps, 5)
    x, _ = make_blobs(n_samples=200, n_features=3, centers=4, cluster_std=1.5, random_state=3)
    assert_same_labels(x, 1.0, 6)


# ------------------------------------------------------------------------------- ties


def grid(side: int, dims: int = 2) -> np.ndarray:
    """Integer grid points, padded with zero columns up to ``dims`` features."""
    pts = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    return np.pad(pts, ((0, 0), (0, dims - 2))).astype(np.float32)


@pytest.mark.parametrize("dims", [2, 20])  # k-d tree and brute force in scikit-learn
def test_points_at_exactly_eps_are_neighbours(dims):
    x = grid(5, dims)
    # Interior points have 4 neighbours at exactly 1 (+ self = 5): core; edge points 4:
    # border; corners see only two edge points: noise.
    labels = assert_same_labels(x, 1.0, 5)
    corners = {0, 4, 20, 24}
    assert [int(v) for v in labels] == [-1 if i in corners else 0 for i in range(25)]
    # A hair below eps the ties drop out and everything is noise: the tie decided the above.
    assert (assert_same_labels(x, 1.0 - 1e-6, 5) == -1).all()


@pytest.mark.parametrize("dims", [3, 24])
def test_exact_ties_on_random_integer_points_equal_sklearn(dims):
    for seed in range(2):
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 4, size=(150, dims)).astype(np.float32)
        for eps in (1.0, 2.0, 3.0):
            for min_samples in (2, 4, 8):
                assert_same_labels(x, eps, min_samples)


def test_float32_rows_by_brute_force_square_eps_in_float32_as_sklearn_does():
    # Two points at exactly distance 2; eps a hair below 2 rounds to 2.0 in float32, and
    # scikit-learn's EuclideanDistance32 squares it there (4.0): neighbours. float64 would say
    # 4 - 8e-9 < 4: not neighbours. In 20 dimensions scikit-learn searches by brute force.
    x = np.zeros((4, 20), dtype=np.float32)
    x[1, 0] = 2.0
    x[2, 0] = 10.0
    x[3, 0] = 12.0
    eps = 2.0 * (1 - 1e-9)
    assert np.array_equal(assert_same_labels(x, eps, 2), [0, 0, 1, 1])
    # float64 rows: eps squared in float64, the pairs fall apart.
    assert np.array_equal(assert_same_labels(x.astype(np.float64), eps, 2), [-1, -1, -1, -1])


def test_low_dimensional_float32_rows_take_the_trees_float64_radius():
    # d <= 15 (and n > 11): scikit-learn's k-d tree, float64 throughout.
    x = np.zeros((30, 2), dtype=np.float32)
    x[:, 0] = np.arange(30) * 2.0
    eps = 2.0 * (1 - 1e-9)
    assert (assert_same_labels(x, eps, 2) == -1).all()
    # n <= 11: NearestNeighbors' default n_neighbors=5 >= n // 2 sends it to brute force.
    assert (assert_same_labels(x[:10], eps, 2) >= 0).all()


# -------------------------------------------------------------------- special cases


def test_duplicate_rows_count_towards_min_samples():
    x = np.array([[0.0, 0.0]] * 3 + [[5.0, 5.0]] * 2 + [[9.0, 0.0]], dtype=np.float32)
    labels = assert_same_labels(x, 0.5, 3)
    assert labels.tolist() == [0, 0, 0, -1, -1, -1]
    rng = np.random.default_rng(3)
    for d in (2, 40):
        base = rng.normal(size=(80, d)).astype(np.float32)
        x = np.concatenate([base, base[rng.integers(0, 80, 60)]])[rng.permutation(140)]
        for min_samples in (2, 3, 5):
            eps = reference_knee(x, min_samples)
            assert_same_labels(x, eps, min_samples)
            assert_same_labels(x, eps * 0.5, min_samples)


def test_all_noise_when_no_point_is_core():
    rng = np.random.default_rng(4)
    for d in (2, 30):
        x = rng.uniform(size=(100, d)).astype(np.float32)
        assert (assert_same_labels(x, 1e-3, 2) == -1).all()


def test_one_cluster_when_eps_covers_everything():
    rng = np.random.default_rng(6)
    for d in (2, 30):
        x = rng.uniform(size=(100, d)).astype(np.float32)
        assert (assert_same_labels(x, 100.0, 5) == 0).all()


def test_border_point_reachable_from_two_clusters_takes_the_first_expanded_cluster():
    # 1-d: cluster X = {0, 1, 2, 3}, cluster Y = {13, 14, 15, 16}, border b = 8 within 5.5 of
    # 3 and 13 only (3 neighbours with itself < 4: not core). Index order: X's first point
    # comes first, so X is cluster 0, but b's first core neighbour by index is in Y.
    pos = [0, 13, 14, 15, 16, 8, 1, 2, 3]
    x = np.array(pos, dtype=np.float32)[:, None]
    labels = assert_same_labels(x, 5.5, 4)
    assert labels.tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0]
    # Put a Y point first: Y is cluster 0 and the border joins Y.
    labels = assert_same_labels(x[[1, 0, 2, 3, 4, 5, 6, 7, 8]], 5.5, 4)
    assert labels.tolist() == [0, 1, 0, 0, 0, 0, 1, 1, 1]


def test_min_samples_one_makes_every_point_core_and_nothing_noise():
    rng = np.random.default_rng(8)
    for d in (2, 25):
        x = rng.normal(size=(150, d)).astype(np.float32)
        eps = reference_knee(x, 3)
        labels = assert_same_labels(x, eps, 1)
        assert (labels >= 0).all() and labels.max() > 0


def test_long_chain_is_one_cluster_whatever_the_index_order():
    # A path graph is the slow case for label propagation; shuffled so indices zigzag.
    rng = np.random.default_rng(9)
    x = (np.arange(400, dtype=np.float32) * 1.0)[rng.permutation(400), None]
    assert (assert_same_labels(x, 1.0, 3) == 0).all()


def test_host_waits_once_per_propagation_round_not_per_pointer_jump():
    # Indices in reverse order along a path: one round hooks every point onto its left
    # neighbour (a chain 400 long), the pointer jumps flatten it, a second round confirms.
    # Checking convergence after every jump took 13 syncs here (a GPU's queue drained each).
    x = torch.arange(400, dtype=torch.float32).flip(0)[:, None]
    with device_branches(), count_dispatch() as counts:
        labels = dbscan(x, 1.0, 3)
    assert (labels == 0).all()
    assert dict(counts.syncs_by_operator) == {"equal.default": 2}


# -------------------------------------------------------------------- batching, eps


def whole_matrix_graph(x: torch.Tensor, radius2: float) -> torch.Tensor:
    """The neighbour graph from every pair's squared distance (the CUDA path's)."""
    near = pairwise_sq_distances(x[None])[0] <= radius2
    return near | near.mT


def assert_banded_equals_whole(x: torch.Tensor, eps: float) -> float:
    """banded_neighbours == the whole matrix's graph; returns the share of pairs that are
    neighbours (so callers can check that sparse and dense graphs were both tried)."""
    radius2 = float(np.float32(eps) * np.float32(eps))
    expected = whole_matrix_graph(x, radius2)
    got = banded_neighbours(x, radius2)
    assert got.dtype == torch.bool and got.shape == expected.shape
    assert torch.equal(got, expected), f"{int((got != expected).sum())} pairs differ (eps={eps})"
    return float(expected.double().mean())


def test_banded_neighbour_graph_equals_the_whole_matrix_on_correlation_like_rows():
    shares = []
    for seed, n in enumerate((65, 130, 441, 800)):
        rng = np.random.default_rng(40 + seed)
        r = correlation_like(rng, n, int(rng.integers(2, 9)), noise=float(rng.uniform(0.6, 1.6)))
        knee = reference_knee(r, 7)
        for eps in (knee * 0.5, knee, knee * 1.5, knee * 4):
            shares.append(assert_banded_equals_whole(torch.from_numpy(r), float(eps)))
    assert min(shares) < 0.05 and max(shares) > 0.5  # sparse and dense graphs both tried


def test_banded_neighbour_graph_equals_the_whole_matrix_on_a_photos_correlation(tiny, astronaut):
    # The R that the product clusters: the tiny model on a real photo at a 16:9 1080p size.
    image = Image.fromarray(astronaut).resize((1920, 1080), Image.BICUBIC)
    vocab = tiny.vocabulary(["person", "rocket"], background=["sky"])
    with torch.inference_mode():
        feats = tiny.dense_features(tiny.prepare(image).pixels[None], vocab)
    r = feats.correlation.float()[0]
    assert r.shape == (798, 798)
    eps, min_samples = tiny.method.refiner.eps_for(r[None])
    shares = [assert_banded_equals_whole(r, float(eps) * f) for f in (0.7, 1.0, 1.3)]
    assert max(shares) > 0.01
    labels = dbscan(r, eps, min_samples).numpy()
    assert np.array_equal(labels, sklearn_labels(r.numpy(), float(eps), min_samples))


def test_banded_neighbour_graph_on_float64_integer_duplicate_and_constant_rows():
    rng = np.random.default_rng(44)
    ties = rng.integers(0, 4, size=(300, 24)).astype(np.float64)  # exact distances, many ties
    for eps in (2.0, 3.0, np.sqrt(7.0)):
        assert_banded_equals_whole(torch.from_numpy(ties), float(eps))
    duplicated = np.repeat(rng.normal(size=(50, 30)), 3, axis=0).astype(np.float32)
    assert_banded_equals_whole(torch.from_numpy(duplicated), 0.5)
    constant = np.ones((100, 20), dtype=np.float32)  # no spread: no direction to project on
    assert bool(banded_neighbours(torch.from_numpy(constant), 0.25).all())


def test_banded_neighbour_graph_with_non_finite_rows_is_the_whole_matrix_graph():
    rng = np.random.default_rng(45)
    x = rng.normal(size=(200, 30)).astype(np.float32)
    x[17, 3] = np.nan
    x[90, 0] = np.inf
    expected = whole_matrix_graph(torch.from_numpy(x), 40.0)
    assert not bool(expected[17].any())  # a NaN row is nobody's neighbour, not even its own
    assert torch.equal(banded_neighbours(torch.from_numpy(x), 40.0), expected)


def test_batch_of_images_equals_each_image_alone():
    rng = np.random.default_rng(10)
    images = [correlation_like(rng, 196, groups=g, noise=1.1) for g in (2, 4, 6, 9)]
    eps, min_samples = 0.9, 3
    batch = dbscan(torch.from_numpy(np.stack(images)), eps, min_samples)
    assert batch.shape == (4, 196)
    for i, r in enumerate(images):
        alone = dbscan(torch.from_numpy(r), eps, min_samples)
        assert torch.equal(batch[i], alone)
        assert np.array_equal(batch[i].numpy(), sklearn_labels(r, eps, min_samples))


def test_eps_per_image_as_a_tensor_equals_sklearn_per_image():
    rng = np.random.default_rng(11)
    images = np.stack([correlation_like(rng, 441, groups=g, noise=1.2) for g in (3, 5, 8)])
    eps = torch.tensor([reference_knee(r, 7) for r in images], dtype=torch.float64)
    labels = dbscan(torch.from_numpy(images), eps, 7)
    for i, r in enumerate(images):
        assert np.array_equal(labels[i].numpy(), sklearn_labels(r, float(eps[i]), 7))
    # The knee computed by the torch version, fed straight back: the pipeline's path.
    knee = k_distance_knee(torch.from_numpy(images), 7)
    assert torch.equal(dbscan(torch.from_numpy(images), knee, 7), labels)


def test_unbatched_rows_give_unbatched_labels():
    x = grid(4)
    labels = dbscan(torch.from_numpy(x), 1.0, 3)
    assert labels.shape == (16,) and labels.dtype == torch.int64
    assert dbscan(torch.from_numpy(x), torch.tensor(1.0), 3).shape == (16,)


def test_invalid_arguments_are_rejected():
    x = torch.zeros(1, 5, 3)
    with pytest.raises(ValueError):
        dbscan(x, 0.0, 3)
    with pytest.raises(ValueError):
        dbscan(x, torch.tensor([1.0, 2.0]), 3)
    with pytest.raises(ValueError):
        dbscan(x, 1.0, 0)
    with pytest.raises(TypeError):
        dbscan(x.to(torch.int64), 1.0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_labels_and_knee_on_cuda_equal_sklearn():
    rng = np.random.default_rng(12)
    images = np.stack([correlation_like(rng, 441, groups=g, noise=1.2) for g in (3, 6)])
    x = torch.from_numpy(images).cuda()
    knee = k_distance_knee(x, 7)
    labels = dbscan(x, knee, 7)
    assert labels.device.type == "cuda" and knee.device.type == "cuda"
    for i, r in enumerate(images):
        assert float(knee[i]) == pytest.approx(reference_knee(r, 7), rel=1e-12, abs=0)
        assert np.array_equal(labels[i].cpu().numpy(), sklearn_labels(r, float(knee[i]), 7))


# ------------------------------------------------------------------ k-distance knee


def assert_same_knee(x: np.ndarray, min_samples: int) -> float:
    expected = reference_knee(x, min_samples)
    got = k_distance_knee(torch.from_numpy(x)[None], min_samples)
    assert got.dtype == torch.float64 and got.shape == (1,)
    np.testing.assert_allclose(float(got[0]), expected, rtol=1e-12, atol=0)
    return expected


@pytest.mark.parametrize("d", [2, 8, 20, 100])
def test_knee_equals_numpy_reference_on_random_and_blob_data(d):
    for seed in range(4):
        rng = np.random.default_rng(seed + 31 * d)
        n = int(rng.integers(3, 250))
        if seed % 2:
            x, _ = make_blobs(
                n_samples=n,
                n_features=d,
                centers=int(rng.integers(1, 5)),
                cluster_std=float(rng.uniform(0.2, 2.0)),
                random_state=seed,
            )
            x = x.astype(np.float32)
        else:
            x = rng.uniform(size=(n, d)).astype(np.float32)
        for min_samples in (1, 7, n + 3):
            assert_same_knee(x, min_samples)


def test_knee_equals_numpy_reference_on_correlation_like_rows():
    rng = np.random.default_rng(13)
    for n, min_samples in ((196, 3), (441, 7), (441, 70)):
        assert_same_knee(correlation_like(rng, n, groups=5, noise=1.0), min_samples)


def test_knee_is_the_floor_below_three_rows():
    for n in (1, 2):
        x = np.random.default_rng(n).normal(size=(n, 4)).astype(np.float32) * 100
        assert assert_same_knee(x, 3) == 1e-6


def test_knee_of_constant_rows_is_the_flat_curve_or_the_floor():
    # Span 0: max(curve[0], 1e-6). Exactly representable values: distance exactly 0 -> floor.
    assert assert_same_knee(np.full((10, 3), 0.5, dtype=np.float32), 3) == 1e-6
    assert assert_same_knee(np.full((40, 30), 0.25, dtype=np.float32), 5) == 1e-6
    # Random constant rows in many dimensions: rounding-level distances, still the floor.
    row = np.random.default_rng(14).normal(size=30).astype(np.float32)
    assert assert_same_knee(np.tile(row, (40, 1)), 5) == 1e-6
    # Two equidistant groups: every k-distance is the same exact 5: a flat curve above 0.
    x = np.array([[0.0, 0.0]] * 2 + [[3.0, 4.0]] * 2, dtype=np.float32)
    assert assert_same_knee(x, 3) == 5.0


def test_knee_batch_equals_each_image_alone():
    rng = np.random.default_rng(15)
    images = np.stack([correlation_like(rng, 196, groups=g, noise=1.0) for g in (2, 5, 7)])
    batch = k_distance_knee(torch.from_numpy(images), 3)
    assert batch.shape == (3,)
    for i, r in enumerate(images):
        assert float(batch[i]) == float(k_distance_knee(torch.from_numpy(r), 3))
        assert float(batch[i]) == pytest.approx(reference_knee(r, 3), rel=1e-12, abs=0)
