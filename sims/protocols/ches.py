r"""The Figure 2 protocol of Razin et al. 2024 (§5, App. H.2): does CHES predict displacement?

Every preference pair is scored on the model's own hidden states (CHES, length-normalised CHES,
normalised token edit distance and the last-hidden inner product,
:func:`sims.analysis.scores.transformer_pair_scores`); for each score the subsets centred on the
0/25/50/75/100th *similarity* percentiles are trained with DPO for one epoch in minibatches
(:func:`sims.flows.core.minibatch_preference_flow`, torch RMSprop), several runs each, and the
change of the mean preferred log-probability over the subset is recorded.

Similarity direction: higher CHES, ln-CHES and last-hidden inner product mean more similar
preferences; a *lower* edit distance does, so its similarity is the negated distance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sims.analysis.scores import UndefinedStatistic, percentile_subsets, spearman
from sims.analysis.scores import transformer_pair_scores as _scores
from sims.flows.core import minibatch_preference_flow
from sims.models.transformer import TransformerPairs, pair_logprobs_chunked
from theory.losses import make_loss

SCORES = ("ches", "ches_ln", "edit_distance", "last_inner")
PERCENTILES = (0, 25, 50, 75, 100)
#: Sign turning each score into a similarity (edit distance: lower is more similar).
SIMILARITY_SIGN = {"ches": 1.0, "ches_ln": 1.0, "edit_distance": -1.0, "last_inner": 1.0}
#: Pre-registered thresholds (the issue's criterion for Figure 2).
MAX_SPEARMAN = -0.8  # Spearman(similarity percentile, change) at most this for CHES
MIN_MARGIN_GROWTH = 0.5  # nats of mean margin growth per subset for a run to show anything


def _subset(pairs: TransformerPairs, rows: np.ndarray) -> TransformerPairs:
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a)[rows], pairs)


def figure2(
    model: Any,
    pairs: TransformerPairs,
    *,
    subset_size: int,
    batch_size: int,
    lr: float,
    beta: float,
    num_runs: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the Figure 2 protocol on ``pairs`` (reference log-probs from ``model``).

    Returns the scores of every pair, and per score and percentile the subset's rows and, per run,
    the change of the mean preferred log-prob and the mean margin growth over the subset; the
    Spearman correlation of similarity percentile with the (run-mean) change per score
    (``None`` with a reason when undefined); and the pre-registered verdict.
    """
    scores = _scores(model, pairs.chosen, pairs.rejected)
    loss = make_loss("dpo", beta=beta)
    out: dict[str, Any] = {"scores": scores, "subsets": {}}
    for name in SCORES:
        rows = percentile_subsets(SIMILARITY_SIGN[name] * scores[name], PERCENTILES, subset_size)
        per_q = []
        for q, idx in zip(PERCENTILES, rows, strict=True):
            sub = _subset(pairs, idx)
            changes, growth = [], []
            for r in range(num_runs):
                res = minibatch_preference_flow(
                    model, sub, loss, lr=lr, batch_size=batch_size, seed=seed + r
                ).run()
                lp_c, lp_r = (
                    np.asarray(a, np.float64) for a in pair_logprobs_chunked(res.final, sub)
                )
                ref_c = np.asarray(sub.ref_logprob_chosen, np.float64)
                ref_r = np.asarray(sub.ref_logprob_rejected, np.float64)
                changes.append(float(np.mean(lp_c - ref_c)))
                growth.append(float(np.mean((lp_c - lp_r) - (ref_c - ref_r))))
            log(
                f"[figure 2] {name} percentile {q}: change of mean ln pi(y+) "
                f"{np.mean(changes):+.3f} (margin growth {np.mean(growth):+.2f})"
            )
            per_q.append({"percentile": q, "rows": idx, "change": changes, "margin_growth": growth})
        out["subsets"][name] = per_q
    out["spearman"], out["spearman_undefined_reason"] = {}, {}
    for name in SCORES:
        mean = [float(np.mean(s["change"])) for s in out["subsets"][name]]
        try:
            out["spearman"][name] = spearman(PERCENTILES, mean)
        except UndefinedStatistic as err:
            out["spearman"][name], out["spearman_undefined_reason"][name] = None, str(err)
    out["verdict"] = figure2_verdict(out)
    return out


def figure2_verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Return the pre-registered Figure 2 verdict for CHES and the same numbers per baseline.

    CHES reproduces the paper if Spearman(similarity percentile, change) <= -0.8, the top
    subset's mean preferred log-prob falls and the bottom subset's rises. A score whose subsets
    grew the margin by less than 0.5 nats on average is ``"uninformative"`` (DPO did not move
    them enough to show displacement either way).

    Example:
      >>> sub = lambda c, g=1.0: {"change": [c], "margin_growth": [g]}
      >>> r = {"spearman": {"ches": -1.0}, "subsets": {"ches": [sub(2.0), sub(1.0), sub(0.0),
      ...      sub(-1.0), sub(-2.0)]}}
      >>> figure2_verdict(r)["ches"]["verdict"]
      'reproduced'
    """
    out = {}
    for name, subsets in result["subsets"].items():
        rho = result["spearman"].get(name)
        bottom = float(np.mean(subsets[0]["change"]))
        top = float(np.mean(subsets[-1]["change"]))
        growth = float(np.mean([np.mean(s["margin_growth"]) for s in subsets]))
        checks = {
            f"spearman_at_most_{MAX_SPEARMAN}": rho is not None and rho <= MAX_SPEARMAN,
            "top_subset_loses": top < 0,
            "bottom_subset_gains": bottom > 0,
        }
        if growth < MIN_MARGIN_GROWTH:
            verdict = "uninformative"
        else:
            verdict = "reproduced" if all(checks.values()) else "not reproduced"
        out[name] = {
            "spearman": rho,
            "top_change": top,
            "bottom_change": bottom,
            "mean_margin_growth": growth,
            "checks": checks,
            "verdict": verdict,
        }
    return out
