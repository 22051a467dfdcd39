"""Independent float64 re-derivations of ACTMat, TSV-M, Iso-C and Iso-CTS, for the tests.

Written straight from the formulas (``docs/family.md``; the TSV-M and Iso papers'
algorithms in the layout of the authors' released code: zero-padded ``[m, r]`` buffers filled
task by task), sharing no code with the package: explicit ``torch.linalg.pinv``, full SVDs,
no rank tolerances. Valid for inputs whose task vectors and sums have full rank, or, with
the noise floor (``docs/method.md``, "Directions at the storage noise floor"), whose directions
are either well above the floors given or at the rounding noise: :func:`rounding_variance`
and :func:`storage_floor` restate the floor from the storage format's spacing.
"""

import math

import torch


def rounding_variance(expert, fmt):
    """Per-entry variance of rounding to ``fmt``, ``spacing^2 / 12`` with the spacing of
    ``fmt`` at each stored value (``nextafter`` towards infinity), in float64; exact zeros
    none."""
    stored = expert.to(fmt).abs()
    spacing = (torch.nextafter(stored, torch.full_like(stored, math.inf)) - stored).double()
    return torch.where(stored == 0, 0.0, spacing**2 / 12)


def storage_floor(variance):
    """``sqrt(max row sum) + sqrt(max column sum)`` of a variance matrix."""
    return math.sqrt(float(variance.sum(1).max())) + math.sqrt(float(variance.sum(0).max()))


def _deltas(base, experts):
    W0 = base.double()
    taus = [e.double() - W0 for e in experts]
    return W0, [t for t in taus if float((t * t).sum()) > 0]


def _mean(W0, taus, lam):
    return W0 + lam * sum(taus) / len(taus)


def reference_actmat(base, experts, weights=None, lam=1.0, floor=None):
    """``floor``: eigenvalues of the Gram at or below it count as zero (default: pinv's)."""
    W0 = base.double()
    taus = [e.double() - W0 for e in experts]
    w = [1.0] * len(taus) if weights is None else [float(x) for x in weights]
    pairs = [(x, t) for x, t in zip(w, taus) if x > 0 and float((t * t).sum()) > 0]
    if W0.dim() != 2:
        return W0 + lam * sum(x * t for x, t in pairs) / sum(x for x, _ in pairs)
    G = sum(x * t.T @ t for x, t in pairs)
    num = sum(x * t @ (t.T @ t) for x, t in pairs)
    if floor is None:
        return W0 + lam * num @ torch.linalg.pinv(G, hermitian=True)
    values, vectors = torch.linalg.eigh(G)
    kept = vectors[:, values > floor]
    return W0 + lam * num @ kept @ torch.diag(1 / values[values > floor]) @ kept.T


def _polar(X):
    u, _, vh = torch.linalg.svd(X, full_matrices=False)
    return u @ vh


def reference_tsv(base, experts, lam=1.0, floors=None):
    """``floors``: per task, singular triplets at or below it are left out (zero in the
    layout, which the polar factors then ignore)."""
    W0, taus = _deltas(base, experts)
    if W0.dim() != 2:
        return _mean(W0, taus, lam)
    T = len(taus)
    m, n = W0.shape
    r = min(m, n)
    k = r // T
    if k == 0:
        return _mean(W0, taus, lam)
    sum_u = torch.zeros(m, r, dtype=torch.float64)
    sum_s = torch.zeros(r, dtype=torch.float64)
    sum_v = torch.zeros(r, n, dtype=torch.float64)
    for i, t in enumerate(taus):
        u, s, v = torch.linalg.svd(t, full_matrices=False)
        if floors is not None:
            drop = s <= floors[i]
            u, s, v = u * ~drop, s * ~drop, v * ~drop[:, None]
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_v[i * k : (i + 1) * k, :] = v[:k, :]
    merged = _polar(sum_u) @ torch.diag(sum_s) @ _polar(sum_v.T).T
    return W0 + lam * merged


def reference_iso_c(base, experts, lam=1.0, floor=None):
    """``floor``: singular values of the sum at or below it neither join the mean nor get a
    direction."""
    W0, taus = _deltas(base, experts)
    if W0.dim() != 2:
        return _mean(W0, taus, lam)
    u, s, v = torch.linalg.svd(sum(taus), full_matrices=False)
    if floor is not None:
        keep = s > floor
        u, s, v = u[:, keep], s[keep], v[keep]
    return W0 + lam * s.mean() * (u @ v)


def reference_iso_cts(base, experts, common_space_fraction=0.8, lam=1.0, floors=None):
    """``floors``: ``(the sum's, [each task's])``: triplets at or below them are left out of
    the common and the task-specific subspaces, and out of the mean."""
    W0, taus = _deltas(base, experts)
    if W0.dim() != 2:
        return _mean(W0, taus, lam)
    T = len(taus)
    r = min(W0.shape)
    common = int(r * common_space_fraction)
    specific_total = round((r - common) / T) * T
    common = r - specific_total
    per_task = specific_total // T
    assert common >= 0, "reference valid only where the budget fits"
    u, s, v = torch.linalg.svd(sum(taus), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    if floors is not None:
        keep = cs > floors[0]
        cu, cs, cv = cu[:, keep], cs[keep], cv[keep]
        common = int(keep.sum())
    all_u = torch.zeros(W0.shape[0], r, dtype=torch.float64)
    all_s = torch.zeros(r, dtype=torch.float64)
    all_v = torch.zeros(r, W0.shape[1], dtype=torch.float64)
    for i, t in enumerate(taus):
        rest = t - cu @ cu.T @ t
        tu, ts, tv = torch.linalg.svd(rest, full_matrices=False)
        if floors is not None:
            drop = ts <= floors[1][i]
            tu, ts, tv = tu * ~drop, ts * ~drop, tv * ~drop[:, None]
        all_u[:, i * per_task : (i + 1) * per_task] = tu[:, :per_task]
        all_s[i * per_task : (i + 1) * per_task] = ts[:per_task]
        all_v[i * per_task : (i + 1) * per_task, :] = tv[:per_task, :]
    all_u[:, T * per_task : T * per_task + common] = cu
    all_s[T * per_task : T * per_task + common] = cs
    all_v[T * per_task : T * per_task + common, :] = cv
    if floors is not None:  # the isotropic scale gives every column a direction: drop them
        keep = all_s > 0
        all_u, all_s, all_v = all_u[:, keep], all_s[keep], all_v[keep]
    merged = all_s.mean() * _polar(all_u) @ _polar(all_v.T).T
    return W0 + lam * merged
