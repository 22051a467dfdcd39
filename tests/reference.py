"""Independent float64 re-derivation of ACE-Merging, written straight from docs/method.md.

Deliberately naive: every per-task matrix is kept, the system is inverted explicitly (or
pseudo-inverted when singular), no running sums, no shared code with the package.
"""

import math

import torch


def reference_ace(
    base,
    experts,
    weights=None,
    eps=1e-5,
    tau=0.3,
    gate="auto",
    refine=True,
    k_frac=0.3,
    prior=True,
    lam=1.0,
    gate_statistic="gamma",
    singular=False,
    floor=None,
):
    """``floor``: the refinement boosts no direction of ``F`` whose singular value is at or
    below it (the noise floor; default: none)."""
    W0 = base.double()
    taus = [e.double() - W0 for e in experts]
    w = [1.0] * len(taus) if weights is None else [float(x) for x in weights]
    keep = [i for i, t in enumerate(taus) if float((t * t).sum()) > 0 and w[i] > 0]
    if not keep:
        return W0.clone(), None
    taus = [taus[i] for i in keep]
    w = [w[i] for i in keep]
    T = len(taus)
    w = [T * x / sum(w) for x in w]

    if W0.dim() != 2:
        return W0 + lam * sum(x * t for x, t in zip(w, taus)) / sum(w), "mean"

    m, n = W0.shape
    identity = torch.eye(n, dtype=torch.float64)
    e = torch.tensor([float((t * t).sum()) for t in taus], dtype=torch.float64)
    if T > 1:
        if gate_statistic == "gamma":
            logs = torch.log(e + 1e-12)
            stat = float(logs.var(unbiased=True) / (logs.mean() ** 2 + 1e-12))
        else:
            stat = float(torch.log10(e).std(unbiased=True))
    else:
        stat = None
    if gate == "on":
        het = True
    elif gate == "off" or stat is None:
        het = False
    else:
        het = stat > tau

    C = [t - t.mean(dim=0, keepdim=True) for t in taus]
    S = [c.T @ c for c in C]
    tr = [float(torch.trace(s)) + 1e-12 for s in S]
    if het:
        Shat = [s / t for s, t in zip(S, tr)]
        if eps == "auto":
            eps_t = [2.0**-12 * float(torch.trace(sh)) for sh in Shat]
        else:
            eps_t = [eps / t for t in tr]
    else:
        Shat = S
        if eps == "auto":
            eps_t = [2.0**-12 * float(torch.trace(sh)) for sh in Shat]
        else:
            eps_t = [eps] * T
    R = [sh + et * identity for sh, et in zip(Shat, eps_t)]

    A = sum(x * r for x, r in zip(w, R))
    if prior:
        c = torch.ones(1, n, dtype=torch.float64) @ sum(x * sh for x, sh in zip(w, Shat)) / n
        if het:
            scale = e if eps != "auto" else e / torch.tensor(tr, dtype=torch.float64)
            c = c / (float(scale.mean()) + 1e-12)
        A = A + torch.ones(n, 1, dtype=torch.float64) @ c
    N = sum(x * ci @ r for x, ci, r in zip(w, C, R))
    W_pre = N @ (torch.linalg.pinv(A) if singular else torch.linalg.inv(A))

    W = W_pre
    k = math.floor(min(m, n) * k_frac)
    if het and refine and k > 0:
        Rbar = sum(x * r for x, r in zip(w, R)) / sum(w)
        D = sum(x * t @ (sh - Rbar) for x, t, sh in zip(w, taus, Shat))
        U, s, Vh = torch.linalg.svd(W_pre + D, full_matrices=False)
        if floor is not None:
            k = min(k, int((s > floor).sum()))
        if k > 0:
            W = W_pre + s[:k].mean() * U[:, :k] @ Vh[:k]
    return W0 + lam * W, ("heterogeneous" if het else "homogeneous")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))
