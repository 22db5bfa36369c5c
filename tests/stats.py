"""Statistical helpers shared by every test file (exactness is tested statistically)."""

import numpy as np
import torch
from scipy import stats as _st

ALPHA = 1e-4  # fixed significance; with ~200 chi-square tests the family-wise false alarm is < 2%
N_DRAWS = 1_000_000


def chisquare_ok(samples: torch.Tensor, probs: torch.Tensor, alpha: float = ALPHA, min_expected: float = 5.0):
    """Chi-square goodness of fit of integer `samples` against `probs` (1-D, sums to 1).

    Cells with expected count < min_expected are pooled into one cell. Returns (ok, p_value, msg).
    Support violations (a sample where probs == 0) fail outright.
    """
    samples = samples.reshape(-1).long().cpu()
    probs = probs.double().cpu().reshape(-1)
    probs = probs / probs.sum()
    n = samples.numel()
    V = probs.numel()
    if int(samples.min()) < 0 or int(samples.max()) >= V:
        return False, 0.0, f"sample outside [0, {V})"
    counts = torch.bincount(samples, minlength=V).double()
    outside = counts[probs == 0].sum().item()
    if outside > 0:
        bad = torch.nonzero((probs == 0) & (counts > 0)).reshape(-1)[:10].tolist()
        return False, 0.0, f"{int(outside)} draws outside the support (tokens {bad})"
    exp = probs * n
    big = exp >= min_expected
    obs_c = counts[big].numpy()
    exp_c = exp[big].numpy()
    small_exp = exp[~big & (probs > 0)].sum().item()
    small_obs = counts[~big & (probs > 0)].sum().item()
    if small_exp > 0:
        obs_c = np.append(obs_c, small_obs)
        exp_c = np.append(exp_c, small_exp)
    if len(obs_c) < 2:
        return True, 1.0, "single cell"
    exp_c = exp_c * (obs_c.sum() / exp_c.sum())
    stat, p = _st.chisquare(obs_c, exp_c)
    return p >= alpha, float(p), f"chi2={stat:.1f} dof={len(obs_c) - 1} p={p:.3g}"


def assert_matches(samples, probs, alpha: float = ALPHA, what: str = ""):
    ok, p, msg = chisquare_ok(samples, probs, alpha)
    assert ok, f"{what}: {msg}"


# ---- distribution families (logits rows), each a 1-D float32 tensor -------------------------
def family(name: str, V: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "peaked":
        x = torch.randn(V, generator=g) * 0.5
        x[3] += 6.0
        x[11] += 4.5
        return x
    if name == "flat":
        return torch.randn(V, generator=g) * 0.05
    if name == "zipf":
        r = torch.arange(1, V + 1, dtype=torch.float64)
        x = (-1.1 * torch.log(r)).float()
        return x[torch.randperm(V, generator=g)]
    if name == "ties":
        levels = torch.tensor([2.0, 1.0, 1.0, 0.0, -1.0])
        return levels[torch.randint(0, 5, (V,), generator=g)]
    if name == "single":
        x = torch.full((V,), float("-inf"))
        x[V // 3] = 0.5
        return x
    raise ValueError(name)


FAMILIES = ["peaked", "flat", "zipf", "ties", "single"]
