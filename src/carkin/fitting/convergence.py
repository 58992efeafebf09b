"""Convergence checks of a fit: R-hat, effective sample sizes, divergences, tree depth and stuck chains,
reported in plain words as FitWarning.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

RHAT_MAX = 1.01
ESS_PER_CHAIN_MIN = 100
TREE_DEPTH_SATURATION_MAX = 0.01  # fraction of draws allowed to hit the maximal tree depth


class FitWarning(UserWarning):
    """A sampler diagnostic is off (divergences, R-hat, ESS, tree depth)."""


def population_sites(tree: xr.DataTree) -> list[str]:
    """Names of the population-level posterior variables (no subject or obs dimension)."""
    post = tree["posterior"].to_dataset()
    return [k for k, v in post.data_vars.items() if v.dims == ("chain", "draw")]  # type: ignore[misc]  # names are str


def stuck_chains(tree: xr.DataTree) -> list[int]:
    """Chains whose population draws never changed (a sampler that could not move at all)."""
    settings = json.loads(tree.attrs.get("settings", "{}"))
    if settings.get("method") != "nuts":
        return []
    post = tree["posterior"].to_dataset()[population_sites(tree)]
    if not post.data_vars:
        return []
    moved = sum((v.max("draw") > v.min("draw")).astype(int) for v in post.data_vars.values())
    return [int(c) for c in post["chain"].values[np.asarray(moved) == 0]]


def convergence_report(tree: xr.DataTree) -> list[str]:
    """Sampler problems in plain words, each with what to try. Empty when all is well."""
    settings = json.loads(tree.attrs.get("settings", "{}"))
    if settings.get("method") != "nuts":
        return []
    stuck = stuck_chains(tree)
    messages = []
    if stuck:  # R-hat and ESS are undefined for a chain that never moved: judged on the others below
        messages.append(f"chain(s) {stuck} never moved (every draw the same): the sampler is stuck and the fit is "
                        "not usable. Try method='svi' first, fix parameters the data cannot identify, or more "
                        "warmup; check the data's units against the model.")
    stats = tree["sample_stats"].to_dataset()
    n_div = int(stats["diverging"].sum())
    total = stats["diverging"].size
    if n_div:
        messages.append(
            f"{n_div} of {total} transitions diverged: the sampler met curvature it could not follow, so the "
            "posterior may be biased there. Try target_accept=0.95, tighter priors, or fixing parameters the "
            "data cannot identify.")
    depth = settings.get("max_tree_depth", 10)
    saturated = float((stats["tree_depth"] >= depth).mean())
    if saturated > TREE_DEPTH_SATURATION_MAX:
        messages.append(
            f"{100 * saturated:.0f}% of draws hit the maximal tree depth {depth}: sampling is inefficient and may "
            "not have explored the posterior. Increase max_tree_depth, or rescale/reparameterise strongly "
            "correlated parameters.")
    sites = population_sites(tree)
    post = tree["posterior"].to_dataset()[sites]
    post = post.sel(chain=[c for c in post["chain"].values if int(c) not in stuck])
    chains = post.sizes["chain"]
    if chains == 0:
        return messages
    if chains > 1:
        rhat = _rhat(post)
        high = {k: v for k, v in rhat.items() if not v <= RHAT_MAX}
        if high:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(high.items(), key=lambda kv: -kv[1]))
            messages.append(
                f"R-hat above {RHAT_MAX} for {shown}: the chains disagree, so they have not converged. Run more "
                "warmup and samples, start from init='svi', or check for a multimodal posterior.")
    ess = _ess(post)
    low = {k: v for k, v in ess.items() if v < ESS_PER_CHAIN_MIN * chains}
    if low:
        shown = ", ".join(f"{k} {v:.0f}" for k, v in sorted(low.items(), key=lambda kv: kv[1]))
        messages.append(
            f"bulk effective sample size below {ESS_PER_CHAIN_MIN * chains} ({ESS_PER_CHAIN_MIN} per chain) for "
            f"{shown}: the summaries of these are noisy. Draw more samples (or more chains).")
    return messages


def _rhat(post: xr.Dataset) -> dict:
    from arviz_stats import rhat

    r = rhat(post)
    return {k: float(r[k]) for k in r.data_vars}


def _ess(post: xr.Dataset, method: str = "bulk") -> dict:
    from arviz_stats import ess

    e = ess(post, method=method)
    return {k: float(e[k]) for k in e.data_vars}
