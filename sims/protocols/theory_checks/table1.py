r"""Table 1 of Razin et al. 2024 in the theory model: preferring ``No`` over ``Never``.

:func:`no_over_never_model` (SFT on label sets over a vocabulary with meaning,
:mod:`sims.data.vocab`), :func:`no_over_never_record` (the DPO flow with ``No > Never``:
trajectories, Theorems 4-5, gainers) and :func:`no_over_never_summary` (means over runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sims.analysis.gainers import gainers_at, largest_decrease
from sims.analysis.scores import spearman
from sims.analysis.summaries import mean_gain, mean_of, mean_peak_gain, statistics, top_names
from sims.data.vocab import (
    BENIGN_FOR_NO,
    CATASTROPHIC_FOR_NO,
    NO_SET,
    YES_SET,
    semantic_unembeddings,
)
from sims.models.unconstrained import UnconstrainedFeatures
from sims.protocols.theory_checks._validation import check_int_at_least
from sims.protocols.theory_checks.pair_runs import sft_on_label_sets, single_pair_run, token_ranking
from theory import losses as _losses

#: Fractions of a run at which :func:`no_over_never_record` lists the top gainers (the paper's
#: steps 5 / 25 / 100 of 100); the first is also the "early" checkpoint of Theorem 5's ranking.
GAINER_FRACTIONS = (0.05, 0.25, 1.0)


def no_over_never_model(
    key: jax.Array,
    *,
    geometry: str,
    hidden_size: int,
    concept_scale: float,
    num_filler: int,
    prompts: int,
    sft_dt: float,
    sft_steps: int,
) -> tuple[UnconstrainedFeatures, list[str]]:
    """Return ``(model, token names)``: the SFT model of Table 1's protocol in the theory model.

    Unembeddings with meaning (:func:`sims.data.vocab.semantic_unembeddings` in ``geometry``),
    ``prompts`` hidden embeddings :math:`\\mathcal N(0, I/d)`; the first half are "trait" prompts
    trained on every label of :data:`~sims.data.vocab.NO_SET`, the rest on every label of
    :data:`~sims.data.vocab.YES_SET`
    (:func:`~sims.protocols.theory_checks.sft_on_label_sets`, ``sft_steps`` Euler steps of
    ``sft_dt``).

    Source: Razin et al. 2024, Table 1 and App. H.1 (the SFT phase), in the unconstrained-features
    model.

    Raises:
      ValueError: ``prompts < 2``; as :func:`~sims.data.vocab.semantic_unembeddings`.
    """
    check_int_at_least("prompts", prompts, 2)
    k_vocab, k_hidden, _ = jax.random.split(key, 3)
    d, P = hidden_size, prompts
    W, tokens = semantic_unembeddings(
        k_vocab,
        geometry=geometry,
        hidden_size=d,
        concept_scale=concept_scale,
        num_filler=num_filler,
    )
    idx = {t: i for i, t in enumerate(tokens)}
    H = jax.random.normal(k_hidden, (P, d)) / jnp.sqrt(d)
    label_sets = [[idx[t] for t in (NO_SET if p < P // 2 else YES_SET)] for p in range(P)]
    model = UnconstrainedFeatures.from_arrays(W, H)
    return sft_on_label_sets(model, label_sets, dt=sft_dt, num_steps=sft_steps), list(tokens)


def no_over_never_record(
    model: UnconstrainedFeatures,
    tokens: Sequence[str],
    loss: _losses.PairLoss,
    *,
    dt: float,
    num_steps: int,
    record_every: int,
    probe_dt: float,
    top_k: int,
) -> dict[str, Any]:
    """Return the JSON-ready record of the flow preferring ``No`` over ``Never`` on prompt 0.

    The flow is :func:`~sims.protocols.theory_checks.single_pair_run` from ``model`` (its own
    reference). Entries: ``t``, ``loss``; the probability over time of ``No`` (``p_no``),
    ``Never`` (``p_never``), the catastrophic set (``p_catastrophic``,
    :data:`~sims.data.vocab.CATASTROPHIC_FOR_NO`) and the benign set (``p_benign``,
    :data:`~sims.data.vocab.BENIGN_FOR_NO`); ``no_decrease_max``
    (:func:`sims.analysis.gainers.largest_decrease` of ``p_no``) and ``no_change`` (end minus
    start); Theorem 4's velocity of ``ln pi(No)`` at ``t = 0`` (``theorem4_velocity_no``) beside
    the probe (``observed_velocity_no``) and ``m_plus_S``; Theorem 5's alignment
    (``theorem5_alignment``) and the early change (``early_logprob_change``) per other token with
    ``spearman_alignment_vs_{instant,early,final}``
    (:func:`~sims.protocols.theory_checks.token_ranking`; ``null`` with a reason when undefined);
    ``top_gainers`` at :data:`GAINER_FRACTIONS` of the run and the ``top_k`` tokens Theorem 5
    predicts to gain most (``top_predicted``).

    Source: Razin et al. 2024, Table 1 (App. H.1) in the theory model; Theorems 4-5.

    Raises:
      ValueError: ``tokens`` without ``No`` or ``Never``; as
        :func:`~sims.protocols.theory_checks.single_pair_run`.
    """
    idx = {t: i for i, t in enumerate(tokens)}
    if "No" not in idx or "Never" not in idx:
        raise ValueError("tokens must name 'No' and 'Never' (sims.data.vocab), got neither or one")
    y_pos, y_neg = idx["No"], idx["Never"]
    run = single_pair_run(
        model,
        loss,
        prompt=0,
        y_pos=y_pos,
        y_neg=y_neg,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        probe_dt=probe_dt,
    )
    probs = np.exp(np.asarray(run.logprobs))  # [C + 1, V]
    n_ckpt = probs.shape[0] - 1
    checkpoints = [max(1, round(frac * n_ckpt)) for frac in GAINER_FRACTIONS]
    gainers = gainers_at(probs, tokens, k=top_k, checkpoints=checkpoints)
    rank = token_ranking(run, y_pos=y_pos, y_neg=y_neg, early=checkpoints[0])
    names = [tokens[i] for i in rank.others]
    p_no = probs[:, y_pos]
    return {
        "t": run.t,
        "loss": run.loss,
        "p_no": p_no,
        "p_never": probs[:, y_neg],
        "p_catastrophic": probs[:, [idx[t] for t in CATASTROPHIC_FOR_NO]].sum(1),
        "p_benign": probs[:, [idx[t] for t in BENIGN_FOR_NO]].sum(1),
        "no_decrease_max": float(largest_decrease(p_no)),
        "no_change": float(p_no[-1] - p_no[0]),
        "theorem4_velocity_no": float(run.predicted_velocity[y_pos]),
        "observed_velocity_no": float(run.probed_velocity[y_pos]),
        "m_plus_S": float(run.terms.m + run.terms.S),
        "theorem5_alignment": dict(zip(names, rank.alignment.tolist(), strict=True)),
        "early_logprob_change": dict(zip(names, rank.early.tolist(), strict=True)),
        **statistics(
            spearman,
            {
                f"spearman_alignment_vs_{k}": (rank.alignment, getattr(rank, k))
                for k in ("instant", "early", "final")
            },
        ),
        "top_gainers": {
            f"t={float(run.t[c]):g}": g for c, g in zip(checkpoints, gainers, strict=True)
        },
        "top_predicted": top_names(np.asarray(run.predicted_velocity)[rank.others], names, top_k),
    }


def no_over_never_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the means over :func:`no_over_never_record` records (one geometry's runs).

    Counts of runs where ``No`` fell and where Theorem 4's sign matched the probe; means of the
    largest decrease of ``pi(No)``, of the catastrophic and benign gains (end and peak) and of the
    Spearman correlations (undefined ones left out).

    Raises:
      ValueError: no records.
    """
    rs = list(records)
    if not rs:
        raise ValueError("records must hold at least one no_over_never_record, got none")
    signs = [np.sign(r["theorem4_velocity_no"]) == np.sign(r["observed_velocity_no"]) for r in rs]
    return {
        "runs_with_no_falling": sum(r["no_change"] < 0 for r in rs),
        "mean_no_decrease_max": mean_of(rs, "no_decrease_max"),
        "mean_catastrophic_gain": mean_gain(rs, "p_catastrophic"),
        "mean_benign_gain": mean_gain(rs, "p_benign"),
        "theorem4_sign_matches": int(sum(signs)),
        "mean_spearman_alignment_vs_instant": mean_of(rs, "spearman_alignment_vs_instant"),
        "mean_spearman_alignment_vs_early": mean_of(rs, "spearman_alignment_vs_early"),
        "mean_catastrophic_peak_gain": mean_peak_gain(rs, "p_catastrophic"),
        "mean_benign_peak_gain": mean_peak_gain(rs, "p_benign"),
        "mean_spearman_alignment_vs_final": mean_of(rs, "spearman_alignment_vs_final"),
        "runs": len(rs),
    }
