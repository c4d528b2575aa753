r"""Single-token displacement on real token geometry: the Table 1 / Table 13 protocol, scaled down.

Razin et al. 2024 (§3, App. H.1) run SFT and then DPO / IPO on one prompt at a time with
single-token answers. Here the unconstrained-features model starts from real word embeddings
``W(0)`` (e.g. MiniLM's, :mod:`sims.data.real_embeddings`):

* :class:`GeometrySettings` -- the protocol's knobs (an experiment ``Config`` derives from it);
  :func:`geometry_protocol` -- the whole protocol on ``W(0)``, from the parts:
* :func:`label_set_features_sft` -- SFT on prompts labelled from ``N`` (:data:`NEG_WORDS`,
  trait-according prompts) or ``Y`` (:data:`POS_WORDS`), prompts of one class around one centre;
* :func:`geometry_table13` -- Table 13's split of :math:`W_{y^+} - W_{y^-}` before and after SFT;
* :func:`preference_rows` -- DPO and IPO runs for each pair of :data:`TABLE1_PAIRS` on prompts of
  :math:`y^+`'s class: per run the largest decrease of :math:`\pi(y^+)`, the top gainers at
  :data:`~sims.protocols.persona.GAINER_STEPS`, Theorem 4's sign and Theorem 5's top gainers at
  ``t = 0`` (:func:`geometry_run`); per (loss, pair) their tallies (:func:`geometry_row`) with
  each gainer's kind (:func:`gainer_kind`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sims.analysis.gainers import gainers_at, largest_decrease
from sims.analysis.summaries import mean_of, relative_error, sign_match_rate, top_names
from sims.errors import InputError
from sims.flows.core import FlowResult, SFTData, preference_flow, sft_flow
from sims.models.unconstrained import UnconstrainedFeatures, make_pairs
from sims.protocols.persona import GAINER_STEPS, table13
from theory.losses import make_loss, margin_derivative
from theory.single_token import logprob_velocity

__all__ = [
    "GeometrySettings",
    "NEG_WORDS",
    "POS_WORDS",
    "TABLE1_PAIRS",
    "gainer_kind",
    "geometry_protocol",
    "geometry_row",
    "geometry_run",
    "geometry_table13",
    "label_set_features_sft",
    "preference_rows",
]

#: Label set N (the paper's No, Never, Maybe, Perhaps; lowercase word-piece vocabulary).
NEG_WORDS = ("no", "never", "maybe", "perhaps")
#: Label set Y (the paper's Yes, Yeah, Sure, Certainly, Absolutely).
POS_WORDS = ("yes", "yeah", "sure", "certainly", "absolutely")
#: The ``(y+, y-)`` pairs of Table 1.
TABLE1_PAIRS = (("yes", "no"), ("no", "never"), ("sure", "yes"))


def gainer_kind(word: str, y_pos: str) -> str:
    """Return a gainer's kind (Table 1) for preferred word ``y_pos``.

    ``"preferred"`` (``y_pos`` itself), ``"benign"`` (``y_pos``'s label set),
    ``"catastrophic"`` (the other label set) or ``"other"``.

    Example:
      >>> [gainer_kind(w, "no") for w in ("no", "never", "yes", "cat")]
      ['preferred', 'benign', 'catastrophic', 'other']
    """
    same, other = (POS_WORDS, NEG_WORDS) if y_pos in POS_WORDS else (NEG_WORDS, POS_WORDS)
    if word == y_pos:
        return "preferred"
    if word in same:
        return "benign"
    return "catastrophic" if word in other else "other"


def label_set_features_sft(
    W0: jax.Array,
    ids: Mapping[str, int],
    *,
    seed: int,
    num_prompts: int,
    hidden_scale: float,
    prompt_spread: float,
    dt: float,
    num_steps: int,
) -> FlowResult:
    r"""Return the SFT flow result of an unconstrained-features model started from ``W0``.

    Prompts ``[0, P // 2)`` accord with the trait and get a label drawn uniformly from
    :data:`NEG_WORDS`, the rest one from :data:`POS_WORDS` (``np.random.default_rng(seed)``).
    Initial hidden embeddings share a centre per class (a network maps similar prompts to
    similar ``h``):

    .. math:: h_i(0) = \frac{s}{\sqrt d}\,(c_{k(i)} + \sigma\,\varepsilon_i),\qquad
       c_k, \varepsilon_i \sim \mathcal N(0, I_d)

    with ``s = hidden_scale`` and :math:`\sigma` = ``prompt_spread``. Full-batch SGD (gradient
    flow, :func:`sims.flows.core.sft_flow`) on every ``W`` row and every ``h``.

    Args:
      W0: ``[V, d]`` initial unembeddings.
      ids: row of each word of :data:`NEG_WORDS` and :data:`POS_WORDS` in ``W0``.
      seed: label and embedding seed.
      num_prompts: ``P >= 2``.
      hidden_scale, prompt_spread: ``s > 0`` and :math:`\sigma \ge 0`.
      dt, num_steps: Euler step and step count.

    Returns:
      :class:`~sims.flows.core.FlowResult` (``final`` the SFT model, ``observables`` the label
      log-probs).

    Raises:
      ValueError: ``num_prompts < 2``, a label word missing from ``ids``.
    """
    if num_prompts < 2:
        raise ValueError(f"num_prompts must be >= 2 (one per class), got {num_prompts}")
    missing = [w for w in NEG_WORDS + POS_WORDS if w not in ids]
    if missing:
        raise ValueError(f"ids must hold every label word, missing {missing}")
    rng = np.random.default_rng(seed)
    P, d = num_prompts, W0.shape[1]
    half = P // 2  # prompts [0, half) accord with the trait and get labels from N
    labels = np.concatenate(
        [
            rng.choice([ids[w] for w in NEG_WORDS], half),
            rng.choice([ids[w] for w in POS_WORDS], P - half),
        ]
    )
    centres = rng.standard_normal((2, d))[(np.arange(P) >= half).astype(int)]  # [P, d]
    noise = prompt_spread * rng.standard_normal((P, d))
    H0 = hidden_scale / np.sqrt(d) * (centres + noise)
    model = UnconstrainedFeatures.from_arrays(W0, jnp.asarray(H0))
    return sft_flow(
        model,
        SFTData(jnp.arange(P), jnp.asarray(labels)),
        dt=dt,
        num_steps=num_steps,
        optimizer="sgd",
    ).run()


def geometry_table13(W0: Any, W: Any, ids: Mapping[str, int]) -> dict[str, dict[str, list]]:
    r"""Return Table 13 for each pair of :data:`TABLE1_PAIRS`, before (``W0``) and after (``W``).

    Per pair ``"y+>y-"``, each a two-entry list (before, after): ``proj_norm`` and ``orth_norm``,
    the norms of the parts of :math:`W_{y^+} - W_{y^-}` along :math:`W_{y^+}` and orthogonal to
    it (:func:`sims.protocols.persona.table13`), and ``inner_pos_neg``
    :math:`\langle W_{y^+}, W_{y^-}\rangle`.

    Source: Razin et al. 2024, Table 13 (App. H.1).

    Example:
      >>> ids = {"yes": 0, "no": 1, "never": 2, "sure": 3}
      >>> W = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
      >>> geometry_table13(W, W, ids)["yes>no"]
      {'proj_norm': [0.0, 0.0], 'orth_norm': [1.0, 1.0], 'inner_pos_neg': [1.0, 1.0]}
    """
    out = {}
    for yp, yn in TABLE1_PAIRS:
        split = [table13(M, [(ids[yp], ids[yn])])[0] for M in (W0, W)]
        out[f"{yp}>{yn}"] = {
            "proj_norm": [t["projection_on_w_pos"] for t in split],
            "orth_norm": [t["orthogonal"] for t in split],
            "inner_pos_neg": [float(M[ids[yp]] @ M[ids[yn]]) for M in (W0, W)],
        }
    return out


def geometry_run(
    prompt: int,
    probs: np.ndarray,
    velocity: np.ndarray,
    first_step: np.ndarray,
    words: Sequence[str],
    pos: int,
) -> dict[str, Any]:
    r"""Return one run's record: :math:`\pi(y^+)`, its largest decrease, gainers, Theorem 4 vs
    the first step.

    Args:
      prompt: the run's prompt index.
      probs: ``[T+1, V]`` probabilities at the prompt along the run.
      velocity: ``[V]`` Theorems 4-5 prediction of :math:`\frac{d}{dt}\ln\pi` at ``t = 0``.
      first_step: ``[V]`` the first Euler step's change of :math:`\ln\pi` over ``dt``.
      words: the ``V`` token names; pos: the row of :math:`y^+`.

    Returns:
      dict: ``pi_pos`` ``[T+1]``, ``decrease`` (:func:`sims.analysis.gainers.largest_decrease`),
      ``gainers`` (top-3 names at each step of ``GAINER_STEPS``), ``predicted_velocity_pos``,
      ``observed_first_step_pos``, ``predicted_gainers`` (top 3 of :math:`\pi_z(0) v_z`, the
      first-order probability gain) and ``velocity_rel_error``.

    Example:
      >>> probs = np.array([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]] + [[0.2, 0.3, 0.5]] * 99)
      >>> r = geometry_run(0, probs, np.array([-1.0, 0.0, 1.0]), np.array([-1.0, 0.0, 1.0]),
      ...                  ["a", "b", "c"], 0)
      >>> round(r["decrease"], 12), r["gainers"][0][0], r["velocity_rel_error"]
      (0.3, 'c', 0.0)
    """
    gainers = gainers_at(probs, words, k=3, checkpoints=GAINER_STEPS)
    return {
        "prompt": prompt,
        "pi_pos": probs[:, pos],
        "decrease": float(largest_decrease(probs[:, pos])),
        "gainers": [[w for w, _ in g] for g in gainers],
        "predicted_velocity_pos": float(velocity[pos]),
        "observed_first_step_pos": float(first_step[pos]),
        "predicted_gainers": top_names(probs[0] * velocity, words, 3),
        "velocity_rel_error": float(relative_error(first_step, velocity)),
    }


def geometry_row(runs: Sequence[dict[str, Any]], y_pos: str) -> dict[str, Any]:
    r"""Return a (loss, pair) row: mean decrease, gainer tallies per report step, Theorem 4 signs.

    ``gainers``: per step of ``GAINER_STEPS`` (as a string), ``{word: [count, kind]}`` most
    common first (:func:`gainer_kind`); ``predicted_gainers``: the counts of the predicted top
    gainers; ``sign_agreement``: the fraction of runs whose predicted and first-step
    :math:`\frac{d}{dt}\ln\pi(y^+)` share a sign.
    """
    counts = [Counter(w for r in runs for w in r["gainers"][s]) for s in range(len(GAINER_STEPS))]
    return {
        "runs": list(runs),
        "mean_decrease": mean_of(runs, "decrease"),
        "gainers": {
            str(s): {w: [n, gainer_kind(w, y_pos)] for w, n in c.most_common()}
            for s, c in zip(GAINER_STEPS, counts, strict=True)
        },
        "predicted_gainers": dict(Counter(w for r in runs for w in r["predicted_gainers"])),
        "sign_agreement": sign_match_rate(
            [r["predicted_velocity_pos"] for r in runs],
            [r["observed_first_step_pos"] for r in runs],
        ),
    }


def _prompt_logprobs(model: UnconstrainedFeatures, pairs) -> jax.Array:
    """[V] ln pi(.|x) of a single-prompt run's prompt (pairs fields [1])."""
    return model(pairs.prompt)[0]


def preference_rows(
    model: UnconstrainedFeatures,
    words: Sequence[str],
    ids: Mapping[str, int],
    *,
    seed: int,
    num_runs: int,
    beta: float,
    dpo_dt: float,
    tau: float,
    ipo_dt: float,
    num_steps: int,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    r"""Return ``{"<loss>:<y+>><y->": row}`` of DPO and IPO runs for every pair of Table 1.

    Each pair gets ``num_runs`` runs, each on one prompt of :math:`y^+`'s class drawn by
    ``np.random.default_rng([seed, 1])`` (the first half of ``model``'s prompts for a word of
    :data:`NEG_WORDS`, the second half otherwise), reference = ``model``; all runs of a loss go
    in one vmapped flow. Per run Theorems 4-5 at ``t = 0`` (:func:`theory.single_token.
    logprob_velocity` with :math:`\ell'` at the reference margin) are compared with the first
    Euler step (an ``O(dt)`` estimate of the velocity): :func:`geometry_run`,
    :func:`geometry_row`.

    Source: Razin et al. 2024, §3 and App. H.1 (Tables 1, 4-12); Theorems 4-5.

    Args:
      model: the SFT model (:func:`label_set_features_sft`).
      words: the ``V`` token names; ids: row of each label word.
      seed: prompt seed; num_runs: runs per (loss, pair).
      beta, dpo_dt: DPO KL coefficient and Euler step; tau, ipo_dt: IPO's.
      num_steps: preference steps (the gainer steps need ``num_steps >= 100``).
      log: receives one line per row (its mean decrease).
    """
    W, H = model.unembedding[...], model.hidden[...]
    P = H.shape[0]
    half = P // 2
    pick = np.random.default_rng([seed, 1])
    prompts = np.stack(
        [
            pick.choice(np.arange(half) if yp in NEG_WORDS else np.arange(half, P), num_runs)
            for yp, _ in TABLE1_PAIRS
        ]
    ).ravel()  # [3 R]
    pos = np.repeat([ids[yp] for yp, _ in TABLE1_PAIRS], num_runs)
    neg = np.repeat([ids[yn] for _, yn in TABLE1_PAIRS], num_runs)
    base = make_pairs(model, prompts, pos, neg)
    pairs = jax.tree_util.tree_map(lambda a: a[:, None], base)  # fields [3 R, 1]
    ref = (base.ref_logprob_chosen, base.ref_logprob_rejected)
    rows = {}
    for loss_type, hyper, dt in (("dpo", {"beta": beta}, dpo_dt), ("ipo", {"tau": tau}, ipo_dt)):
        loss = make_loss(loss_type, **hyper)
        logp = np.asarray(
            preference_flow(
                model,
                pairs,
                loss,
                dt=dt,
                num_steps=num_steps,
                observe=_prompt_logprobs,
                in_axes=(None, 0),
            )
            .run()
            .observables
        )  # [3 R, T+1, V]
        ell = margin_derivative(loss, *ref, *ref)  # [3 R]
        v = np.asarray(
            jax.vmap(logprob_velocity, in_axes=(None, 0, 0, 0, 0))(
                W, H[prompts], jnp.asarray(pos), jnp.asarray(neg), ell
            )
        )  # [3 R, V], Theorems 4-5
        fd = (logp[:, 1] - logp[:, 0]) / dt  # first Euler step, an O(dt) estimate of v
        probs = np.exp(logp)
        for j, (yp, yn) in enumerate(TABLE1_PAIRS):
            runs = [
                geometry_run(int(prompts[r]), probs[r], v[r], fd[r], words, ids[yp])
                for r in range(j * num_runs, (j + 1) * num_runs)
            ]
            key = f"{loss_type}:{yp}>{yn}"
            rows[key] = geometry_row(runs, yp)
            log(f"{key}: mean decrease {rows[key]['mean_decrease']:.3f}")
    return rows


@dataclasses.dataclass(frozen=True)
class GeometrySettings:
    """The knobs of :func:`geometry_protocol` (defaults: MiniLM's ``W(0)`` on a 2-core CPU).

    An experiment ``Config`` derives from this class (its fields become flags); :meth:`check`
    runs in :func:`geometry_protocol` (and when such a config is built).
    """

    num_prompts: int = 64  # SFT prompts; the first half accord with the trait (label from N)
    hidden_scale: float = 0.3  # initial hidden embeddings ~ s / sqrt(d) * (class centre + noise)
    prompt_spread: float = 0.3  # noise around the class centre, relative to the centre's scale
    sft_dt: float = 0.5  # SFT Euler step (gradient-flow time per step)
    sft_steps: int = 30  # SFT steps (full batch; short, as the paper's one epoch at a tiny lr)
    beta: float = 0.1  # DPO KL coefficient (paper: 0.1)
    dpo_dt: float = 2.0  # DPO Euler step
    tau: float = 0.01  # IPO tau (paper's KL coefficient 0.01, target margin 1/(2 tau))
    ipo_dt: float = 0.002  # IPO Euler step (IPO's l' is ~1000x DPO's at tau = 0.01)
    num_steps: int = 100  # preference steps (paper: 100)
    num_runs: int = 10  # runs per (loss, pair), each on a prompt drawn by its seed (paper: 10)

    def check(self) -> None:
        """Raise :class:`~sims.errors.InputError` for settings the protocol cannot run.

        Raises:
          InputError: ``num_prompts < 2`` (one prompt per class), a count below 1, a step,
            scale or coefficient ``<= 0``, or ``prompt_spread < 0``.
        """
        if not isinstance(self.num_prompts, int) or self.num_prompts < 2:
            raise InputError(f"num_prompts must be an integer >= 2, got {self.num_prompts!r}")
        for name in ("sft_steps", "num_steps", "num_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {name}={value!r}")
        for name in ("hidden_scale", "sft_dt", "beta", "dpo_dt", "tau", "ipo_dt"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {name}={getattr(self, name)!r}")
        if not self.prompt_spread >= 0:
            raise InputError(f"prompt_spread must be >= 0, got {self.prompt_spread!r}")


def geometry_protocol(
    W0: jax.Array,
    words: Sequence[str],
    settings: GeometrySettings,
    *,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Return the protocol's results on initial unembeddings ``W0``: SFT, Table 13, Table 1 rows.

    :func:`label_set_features_sft` from ``W0``, then :func:`geometry_table13` of ``W0`` and the
    SFT ``W``, then :func:`preference_rows` from the SFT model (its mean label log-prob at the
    end is ``sft_final_logprob``).

    Source: Razin et al. 2024, §3 and App. H.1 (Tables 1, 4-13).

    Args:
      W0: ``[V, d]`` initial unembeddings (float64 for the theory checks).
      words: the ``V`` token names; every word of :data:`NEG_WORDS` and :data:`POS_WORDS`
        must be among them.
      settings: :class:`GeometrySettings`; seed: the SFT and prompt seed; log: progress lines.

    Returns:
      dict ``sft_final_logprob``, ``table13``, ``rows``.

    Raises:
      InputError: bad ``settings``, or a label word missing from ``words``.
    """
    settings.check()
    missing = [w for w in NEG_WORDS + POS_WORDS if w not in words]
    if missing:
        raise InputError(f"words must hold every label word, missing {missing}")
    ids = {w: list(words).index(w) for w in NEG_WORDS + POS_WORDS}
    sft = label_set_features_sft(
        W0,
        ids,
        seed=seed,
        num_prompts=settings.num_prompts,
        hidden_scale=settings.hidden_scale,
        prompt_spread=settings.prompt_spread,
        dt=settings.sft_dt,
        num_steps=settings.sft_steps,
    )
    model = sft.final
    rows = preference_rows(
        model,
        words,
        ids,
        seed=seed,
        num_runs=settings.num_runs,
        beta=settings.beta,
        dpo_dt=settings.dpo_dt,
        tau=settings.tau,
        ipo_dt=settings.ipo_dt,
        num_steps=settings.num_steps,
        log=log,
    )
    return {
        "sft_final_logprob": float(np.mean(np.asarray(sft.observables)[-1])),
        "table13": geometry_table13(W0, model.unembedding[...], ids),
        "rows": rows,
    }
