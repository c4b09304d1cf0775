"""DBSCAN and the k-distance-knee ``eps`` in torch, batched over images, on the input's device.

The cluster vote runs DBSCAN once per image over the ``n`` rows of ``R``; scikit-learn does it
on the CPU one image at a time. This module does the same work as tensor operations over a
batch ``(B, n, d)`` on whatever device the rows already live on, and returns **scikit-learn's
label arrays** (same numbers, not merely the same partition), so it can replace
``DBSCAN(eps, min_samples).fit_predict`` and ``refine.k_distance_knee`` without changing a
single pseudo-label.

What is reproduced (``sklearn/cluster/_dbscan.py``, ``_dbscan_inner.pyx``,
``sklearn/metrics/_pairwise_distances_reduction``, ``sklearn/neighbors``; scikit-learn 1.9):

* Which neighbour search ``NearestNeighbors(algorithm="auto")`` picks: brute force when
  ``d > 15`` or ``n_neighbors >= n // 2`` (``n_neighbors`` is 5 inside DBSCAN, ``k + 1`` in
  the knee), a k-d tree otherwise. Rows of ``R`` (``d = n >= 196``) always take brute force.
* Brute force (``EuclideanRadiusNeighbors32`` / ``EuclideanArgKmin32`` for float32 rows):
  squared distances ``(|x|^2 + (-2 x.y)) + |y|^2`` from rows upcast to float64 and a float64
  GEMM, clamped at 0 (:func:`pairwise_sq_distances`). For **float32** rows the radius goes
  through ``EuclideanDistance32._dist_to_rdist``, whose argument and result are float32: the
  threshold is ``float32(float32(eps) * float32(eps))``, not ``eps ** 2`` in float64; and
  ``kneighbors`` distances go through ``_rdist_to_dist`` likewise:
  ``float32(sqrt(float32(d2)))``. For float64 rows both stay float64.
* k-d tree (``KDTree64``, rows upcast): squared distances summed feature by feature from
  float64 differences, compared with ``eps * eps`` in float64; distances ``sqrt`` in float64.
* A pair are neighbours iff squared distance ``<=`` that threshold; a point's neighbourhood
  includes itself; core iff neighbourhood size ``>= min_samples``.
* ``dbscan_inner`` visits points in ascending order and depth-first expands each unlabelled
  core point into a new cluster, labelling but not expanding non-core points. Hence, computed
  here in parallel: clusters are the connected components of the core-core neighbour graph,
  numbered in ascending order of their smallest core index; a non-core point with core
  neighbours takes the smallest cluster number among theirs (the first cluster expanded that
  reaches it); every other point is noise, ``-1``. Components come from min-label propagation
  over the core-core adjacency with root hooking and pointer jumping (``l = l[l]``) until
  nothing changes: a handful of ``n x n`` passes, no Python loop over points.

Tie rule: a pair whose exact squared distance is within float64 rounding of the threshold
(relative ``~1e-15`` of the squared row norms) can fall on either side, in either
implementation, because the GEMM's summation order (BLAS kernel, blocking, threads) and the
norms' differ between torch and scikit-learn; on such a pair, and only there, labels can
disagree (likewise a k-distance within float64 rounding of a float32 rounding boundary can
round to the neighbouring float32). Distances that are exact in float64 (small integer
coordinates, integer ``eps``) compare exactly as scikit-learn does: distance exactly ``eps``
is a neighbour. scikit-learn's own brute-force matrix need not be symmetric at that rounding
level; here a pair are neighbours when either of its two computed distances passes (the graph
must be undirected for components), which again only matters at a tie. On the CPU the graph
comes from :func:`banded_graph`, which computes each pair that can be a neighbour once,
in a GEMM block of another shape, and skips the others (provably too far apart): again a
difference at ties only, measured as none on the tests' matrices and real ``R``.
"""

from __future__ import annotations

import torch

__all__ = ["dbscan", "k_distance_knee", "pairwise_sq_distances"]

# NearestNeighbors(algorithm="auto") searches by brute force above this many features.
_TREE_MAX_FEATURES = 15
# DBSCAN builds NearestNeighbors(radius=eps) with the default n_neighbors, which "auto" reads.
_DBSCAN_N_NEIGHBORS = 5
# Whether the CPU builds the graph with banded_graph (per image); False: as on a GPU.
BANDED_ON_CPU = True
# Rows per tile of banded_graph's distance blocks (fastest measured on the CPU).
_BAND_TILE = 64


def pairwise_sq_distances(points: torch.Tensor) -> torch.Tensor:
    """``(B, n, d)`` float32 -> ``(B, n, n)`` float64 squared Euclidean distances.

    Computed the way scikit-learn's brute-force radius/kneighbors reductions compute them for
    float32 input, so that thresholds and k-th distances land where scikit-learn's do: upcast
    to float64, ``||x||^2 + (-2 x.y) + ||y||^2`` (that order of additions), clamped at 0.
    Not forced symmetric nor zero on the diagonal, as scikit-learn's is not. (float64 input:
    the same, without the upcast.)
    """
    _check_points(points)
    x = points.to(torch.float64)
    sq = (x * x).sum(dim=-1)  # (B, n)
    dist = torch.matmul(x, x.mT)  # (B, n, n): x.y
    dist.mul_(-2.0)  # exact: -2 x.y, as the GEMM with alpha=-2
    dist.add_(sq[:, :, None])  # ||x||^2 + (-2 x.y)
    dist.add_(sq[:, None, :])  # ... + ||y||^2
    return dist.clamp_(min=0.0)


def _check_points(points: torch.Tensor) -> None:
    if points.dim() != 3:
        raise ValueError(f"points must be (B, n, d), got shape {tuple(points.shape)}")
    if points.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"points must be float32 or float64, got {points.dtype}")


def _direct_sq_distances(points: torch.Tensor) -> torch.Tensor:
    """``(B, n, n)`` float64 squared distances as scikit-learn's k-d tree sums them.

    ``euclidean_rdist64``: float64 differences, squared and added feature by feature in
    order, so the result is exactly symmetric, exactly 0 on the diagonal and bit-identical to
    the tree's. Only used for ``d <= 15``, so ``d`` passes over ``n x n`` are cheap.
    """
    x = points.to(torch.float64)
    b, n, d = x.shape
    dist = torch.zeros(b, n, n, dtype=torch.float64, device=x.device)
    for f in range(d):
        diff = x[:, :, None, f] - x[:, None, :, f]
        dist = dist + diff * diff  # separate multiply and add: no fused rounding
    return dist


def _brute(n: int, d: int, n_neighbors: int) -> bool:
    """Whether ``NearestNeighbors(n_neighbors, algorithm="auto")`` searches by brute force."""
    return d > _TREE_MAX_FEATURES or n_neighbors >= n // 2


def _sq_distances(points: torch.Tensor, brute: bool) -> torch.Tensor:
    return pairwise_sq_distances(points) if brute else _direct_sq_distances(points)


def _eps_squared(
    eps: float | torch.Tensor, batch: int, device: torch.device, in_float32: bool
) -> torch.Tensor:
    """``(B,)`` float64: the squared radius scikit-learn compares squared distances against.

    ``in_float32``: brute force over float32 rows, where ``EuclideanDistance32._dist_to_rdist``
    squares ``eps`` as a float32 (argument and product rounded to float32).
    """
    if isinstance(eps, torch.Tensor):
        e = eps.detach().to(device=device, dtype=torch.float64).reshape(-1)
        if e.numel() == 1:
            e = e.expand(batch)
        if e.numel() != batch:
            raise ValueError(
                f"eps must be a float or hold one value per image ({batch}), got {tuple(eps.shape)}"
            )
        if not bool((e > 0).all()):
            raise ValueError("eps must be positive")
    else:
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        e = torch.full((batch,), float(eps), dtype=torch.float64, device=device)
    if in_float32:
        e32 = e.to(torch.float32)
        return (e32 * e32).to(torch.float64)
    return e * e


def _small_labels(n: int) -> torch.dtype:
    """Narrowest integer dtype holding ``0..n``: the ``n x n`` masked minima are memory-bound."""
    return torch.int16 if n < 2**15 else torch.int32


def _masked_min(mask: torch.Tensor, values: torch.Tensor, fill: int) -> torch.Tensor:
    """``(B, n)`` int64: per row ``i``, the smallest ``values[j]`` with ``mask[i, j]``, else
    ``fill`` (``values`` ``(B, n)`` in ``0..fill``)."""
    dtype = _small_labels(fill)
    small = values.to(dtype)[:, None, :]
    return (
        torch.where(mask, small, torch.tensor(fill, dtype=dtype, device=mask.device))
        .amin(dim=-1)
        .long()
    )


def _components(near: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` smallest core index of each core point's component (``n`` for non-core).

    Min-label propagation over the core-core part of ``near`` (undirected), hooking each
    root to the smallest label seen by its members, then pointer jumping to the roots,
    repeated until nothing changes (one host sync per round). Labels only ever decrease and
    are always indices of points of the same component; the component's smallest index keeps
    its own label throughout, so at the fixed point (every point's label = its neighbours' =
    its root's) that is the label. Non-core points carry the label ``n``, which never wins a
    minimum, so their columns need no masking; their rows are reset to ``n``.
    """
    b, n = core.shape
    device = core.device
    index = torch.arange(n, device=device).expand(b, n)
    sentinel = torch.tensor(n, device=device)
    # Non-core points point at the sentinel slot n, which points at itself.
    labels = torch.where(core, index, sentinel)
    labels = torch.cat([labels, sentinel.expand(b, 1)], dim=1)  # (B, n + 1)
    jumps = n.bit_length()
    while True:
        previous = labels
        # Smallest label among each core point's core neighbours (and itself).
        seen = torch.minimum(_masked_min(near, labels[:, :n], n), labels[:, :n])
        seen = torch.where(core, seen, sentinel)
        # Hook: each point's current root takes the smallest label its members saw.
        labels = labels.scatter_reduce(1, labels[:, :n], seen, reduce="amin")
        labels[:, :n] = torch.minimum(labels[:, :n], seen)
        # Pointer jumping until every label is a root: a fixed number of jumps, not a check
        # per jump (a host sync each on a GPU). Every label is <= its point's index, so
        # chains descend to a root in at most n steps, and jump j halves what is left:
        # n.bit_length() jumps reach the roots, where more jumps change nothing.
        for _ in range(jumps):
            labels = labels.gather(1, labels)
        if torch.equal(labels, previous):
            return labels[:, :n]


def _neighbour_graph(
    points: torch.Tensor, radius2: torch.Tensor, brute: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(near (B, n, n) bool, order (B, n) int64)``: which pairs are neighbours (squared
    distance ``<=`` the radius), undirected, over the points in the order ``order`` (row ``i``
    of ``near[b]`` is point ``order[b, i]``). On the CPU brute force goes through
    :func:`banded_graph` (the same graph for a fraction of the GEMM, in its own order);
    elsewhere the whole distance matrix, in the points' order."""
    if brute and points.device.type == "cpu" and BANDED_ON_CPU:
        graphs = [banded_graph(x, r2) for x, r2 in zip(points, radius2)]
        return torch.stack([g for g, _ in graphs]), torch.stack([o for _, o in graphs])
    b, n = points.shape[:2]
    return _whole_graph(points, radius2, brute), torch.arange(n, device=points.device).expand(b, n)


def _whole_graph(points: torch.Tensor, radius2: torch.Tensor, brute: bool = True) -> torch.Tensor:
    """``(B, n, n)`` bool neighbour graph from every pair's squared distance, undirected."""
    near = _sq_distances(points, brute) <= radius2[:, None, None]
    return near | near.mT  # undirected; differs from either row only at rounding ties


def banded_neighbours(points: torch.Tensor, radius2: torch.Tensor | float) -> torch.Tensor:
    """:func:`banded_graph` in the points' own order: ``(n, n)`` bool."""
    near, order = banded_graph(points, radius2)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return near.index_select(0, inverse).index_select(1, inverse)


def banded_graph(
    points: torch.Tensor, radius2: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, d)`` rows -> the brute-force neighbour graph ``(n, n)`` bool over the rows in the
    order ``order`` ``(n,)`` it returns, skipping the pairs that cannot be neighbours.

    For a unit vector ``p``, ``|p.x - p.y| <= |x - y|``: sorted by their projection on ``p``,
    a row's neighbours lie in a window of the sorted order. Rows are taken in tiles; each
    tile's squared distances are computed (as :func:`pairwise_sq_distances` computes them) to
    the rows after it whose projections are within the radius, plus a margin ``m`` far above
    float64 rounding, and mirrored. A pair left out is at least ``radius + m`` apart in exact
    arithmetic, so its computed squared distance could not have passed either. Any unit ``p``
    is correct; :func:`_spread_direction`'s makes the window narrow: on CLIPtrase's ``R`` at
    1080p (798 rows) 15-38% of the pairs are computed. The graph stays in the sorted order
    (un-permuting ``n x n`` costs as much as a fifth of the rest); :func:`dbscan` works in
    any order. Rows that are not all finite take the whole matrix, in their own order.
    """
    x = points.to(torch.float64)
    n = x.shape[0]
    r2 = float(radius2)
    sq = (x * x).sum(dim=-1)  # not finite iff a row is not (or overflows: then all pairs)
    if n <= _BAND_TILE or not bool(torch.isfinite(sq).all()):
        whole = _whole_graph(x[None], torch.tensor([r2], dtype=torch.float64, device=x.device))
        return whole[0], torch.arange(n, device=x.device)
    order, tiles = band_tiles(x, sq, r2)
    x, sq = x.index_select(0, order), sq.index_select(0, order)
    near = torch.zeros(n, n, dtype=torch.bool, device=x.device)
    for start, stop, end in tiles:
        block = torch.matmul(x[start:stop], x[start:end].mT)
        block.mul_(-2.0).add_(sq[start:stop, None]).add_(sq[None, start:end])
        close = block <= r2
        near[start:stop, start:end] |= close
        near[start:end, start:stop] |= close.mT
    return near, order


def band_tiles(
    x: torch.Tensor, sq: torch.Tensor, radius2: float
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """:func:`banded_graph`'s plan for float64 rows ``x`` (squared norms ``sq``): the rows'
    order along their spread direction and, per tile of that order, ``(start, stop, end)``:
    sorted rows ``start:stop`` are compared with sorted rows ``start:end``."""
    projection = x @ _spread_direction(x, sq)
    order = torch.argsort(projection, stable=True)
    projection = projection.index_select(0, order)
    radius = radius2**0.5
    largest = float(sq.max()) ** 0.5
    margin = 1e-6 * largest * (1.0 + largest / max(radius, 1e-300))
    reach = torch.searchsorted(projection, projection + (radius + margin), right=True)
    n = x.shape[0]
    tiles = []
    for start in range(0, n, _BAND_TILE):
        stop = min(start + _BAND_TILE, n)
        tiles.append((start, stop, max(stop, int(reach[start:stop].max()))))
    return order, tiles


def _spread_direction(x: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """A unit vector along which the rows ``(n, d)`` (squared norms ``sq``) spread: from their
    mean to the row farthest from it (measured as good as the principal axis on ``R``), without
    forming the centred rows. A basis vector when every row is the mean."""
    mean = x.mean(dim=0)
    farthest = int(torch.argmax(sq - 2.0 * (x @ mean)))  # |x - mean|^2 less the constant |mean|^2
    v = x[farthest] - mean
    norm = torch.linalg.vector_norm(v)
    if not norm > 0:
        v = torch.zeros_like(v)
        v[0] = 1.0
        return v
    return v / norm


def dbscan(points: torch.Tensor, eps: float | torch.Tensor, min_samples: int) -> torch.Tensor:
    """``(B, n, d)`` (or ``(n, d)``) -> ``(B, n)`` (or ``(n,)``) int64 labels, ``-1`` = noise.

    The labels ``sklearn.cluster.DBSCAN(eps, min_samples).fit_predict`` gives each image
    (Euclidean, ``algorithm="auto"``), for a whole batch at once on the input's device.
    ``eps`` is a float or a ``(B,)`` tensor (one radius per image, e.g. from
    :func:`k_distance_knee`).
    """
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ValueError(f"min_samples must be a positive int, got {min_samples!r}")
    single = points.dim() == 2
    if single:
        points = points[None]
    _check_points(points)
    b, n, d = points.shape
    device = points.device
    brute = _brute(n, d, _DBSCAN_N_NEIGHBORS)
    radius2 = _eps_squared(eps, b, device, brute and points.dtype == torch.float32)
    if n == 0:
        out = torch.empty(b, 0, dtype=torch.int64, device=device)
        return out[0] if single else out

    # Everything below is over the graph's rows ("positions"); point order[b, i] is at i.
    near, order = _neighbour_graph(points, radius2, brute)
    core = near.sum(dim=-1, dtype=torch.int32) >= min_samples  # (B, n)

    roots = _components(near, core)  # a root position per core point's component, n elsewhere
    # Each component's smallest point index (slot n collects the non-core points, as n).
    sentinel = torch.full((b, n + 1), n, dtype=torch.int64, device=device)
    smallest = sentinel.scatter_reduce(1, roots, torch.where(core, order, n), reduce="amin")
    first = smallest.gather(1, roots)  # (B, n): the component's smallest point index, n if none
    # Cluster number of a component: the rank of its smallest point index among the others'.
    starts = torch.zeros(b, n + 1, dtype=torch.int64, device=device).scatter_(1, first, 1)
    number = torch.cumsum(starts[:, :n], dim=1) - 1  # meaningful at components' first points
    number = torch.cat([number, torch.full((b, 1), n, device=device)], dim=1)
    cluster = number.gather(1, first)  # (B, n): core positions' cluster, n elsewhere

    # Border points: the smallest cluster number among their core neighbours (n if none);
    # non-core columns hold n, so they need no masking.
    at = torch.where(core, cluster, _masked_min(near, cluster, n))
    at = torch.where(at == n, -1, at)
    labels = torch.empty_like(at).scatter_(1, order, at)  # back to the points' order
    return labels[0] if single else labels


def k_distance_knee(points: torch.Tensor, min_samples: int) -> torch.Tensor:
    """``(B, n, d)`` (or ``(n, d)``) -> ``(B,)`` (or ``()``) float64 ``eps`` per image.

    A row is a core point exactly when its k-distance (``k = min_samples - 1``, distance to
    its ``k``-th nearest other row; scikit-learn counts the point itself) is ``<= eps``; the
    sorted curve is flat inside clusters and steep for outliers, and its knee (the point
    farthest below the chord, both axes scaled to ``[0, 1]``) separates them. Same numbers as
    the numpy/scikit-learn version (its k-distances, float32-rounded for float32 rows as
    ``kneighbors`` returns them), so the ``eps`` and hence the clusters do not change when the
    pipeline moves to this one.
    """
    if points.dim() == 2:
        return k_distance_knee(points[None], min_samples)[0]
    _check_points(points)
    b, n, d = points.shape
    device = points.device
    if n < 3:
        return torch.full((b,), 1e-6, dtype=torch.float64, device=device)
    k = max(1, min(min_samples, n) - 1)
    brute = _brute(n, d, k + 1)
    # (k+1)-th smallest squared distance of each row, self included, as kneighbors(k + 1).
    dist = _sq_distances(points, brute)
    if k < 64:  # topk is much faster for the usual small k; same value either way
        kth = torch.topk(dist, k + 1, dim=-1, largest=False).values[..., k]
    else:
        kth = torch.kthvalue(dist, k + 1, dim=-1).values
    if brute and points.dtype == torch.float32:
        # EuclideanDistance32._rdist_to_dist: float32 in, sqrt, float32 out.
        kdist = kth.to(torch.float32).to(torch.float64).sqrt().to(torch.float32)
        kdist = kdist.to(torch.float64)
    else:
        kdist = kth.sqrt()
    curve = torch.sort(kdist, dim=-1).values  # (B, n)
    first, last = curve[:, 0], curve[:, -1]
    span = last - first
    flat = span <= 0
    # np.linspace(0, 1, n): i * (1 / (n - 1)), the last point exactly 1.
    x = torch.arange(n, dtype=torch.float64, device=device) * (1.0 / (n - 1))
    x[-1] = 1.0
    y = (curve - first[:, None]) / torch.where(flat, torch.ones_like(span), span)[:, None]
    knee = torch.argmax(x - y, dim=-1)  # first maximum, as np.argmax
    at_knee = curve.gather(1, knee[:, None])[:, 0]
    floor = torch.tensor(1e-6, dtype=torch.float64, device=device)
    picked = torch.maximum(at_knee * (1 + 1e-6), floor)
    return torch.where(flat, torch.maximum(first, floor), picked)
