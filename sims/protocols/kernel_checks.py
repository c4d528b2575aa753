r"""Check tables of the kernel form of Theorems 4-5 against the true velocity at ``t = 0``.

With ``h = f(x)`` produced by a network, gradient flow moves ``h`` by :math:`-\ell' K (W_{y^+} -
W_{y^-})` with the hidden-state kernel :math:`K = J J^\top`, not by :math:`-\ell'(W_{y^+} -
W_{y^-})` as with unconstrained features (Theorems 4-5, ``K = I``). For one model and its prompts,
:func:`kernel_form_check` measures, for every token ``z``:

* the truth: ``jax.jvp`` of :math:`\ln\pi(\cdot|x)` along :math:`-\nabla L` of the actual DPO loss
  (:func:`sims.analysis.kernel.velocity_channels`);
* the kernel form: :mod:`theory.kernel` with ``K`` measured by
  :func:`sims.analysis.kernel.hidden_kernel` (tied unembedding: with the cross terms of
  :func:`sims.analysis.kernel.tied_cross_terms`; ``"kernel_no_cross"`` without them);
* the free-h form: :func:`theory.single_token.logprob_velocity` with the model's ``W`` and ``h``;

and compares each prediction with the truth (:func:`compare_velocities`). :func:`check_summary`
pools the tables of a model family, :func:`kernel_verdict` applies the pre-registered criterion
(:data:`MAX_REL_ERR`, every clear sign right); :func:`mlp_instance` draws a random MLP-feature
model and pairs to check. :func:`answer_velocities` gives the free-h form and the truth alone for
single-token answers of a causal transformer, one run per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.analysis.kernel import hidden_kernel, tied_cross_terms, velocity_channels
from sims.analysis.scores import pearson
from sims.analysis.summaries import statistic_per_row, statistic_text
from sims.flows.core import PairObjective, velocity_along_flow
from sims.models.transformer import CausalTransformer, TransformerPairs
from sims.models.unconstrained import MLPFeatures
from sims.protocols.toy_transformer import AnswerLogprobs
from theory import kernel as tk
from theory.losses import make_loss, margin_derivative, mean_pair_loss
from theory.single_token import logprob_velocity, multi_sample_logprob_velocity

__all__ = [
    "AnswerVelocities",
    "COUNTS",
    "FORMS",
    "MAX_REL_ERR",
    "MLPInstance",
    "answer_hidden",
    "answer_velocities",
    "check_summary",
    "check_text",
    "compare_velocities",
    "kernel_form_check",
    "kernel_verdict",
    "mlp_hidden",
    "mlp_instance",
    "summary_text",
]

#: The predictions compared with the truth (``"kernel_no_cross"``: tied models only).
FORMS = ("kernel", "free_h", "kernel_no_cross")
#: Clear-sign counts of a table (:func:`compare_velocities`), summed by :func:`check_summary`.
COUNTS = ("sign_agree_clear", "sign_clear", "gain_agree_clear", "gain_clear")
#: Pre-registered criterion: the kernel form's largest relative error for "reproduced" (far above
#: float64 round-off, far below a missing term).
MAX_REL_ERR = 1e-8


class MLPInstance(NamedTuple):
    """A random MLP-feature model with one single-token pair per prompt.

    Attributes:
      model: float64 :class:`~sims.models.unconstrained.MLPFeatures` (untied ``W``).
      x: ``[N, f]`` prompt features.
      y_pos, y_neg: ``[N]`` token ids, ``y_neg != y_pos``.
    """

    model: MLPFeatures
    x: jax.Array
    y_pos: jax.Array
    y_neg: jax.Array


def mlp_instance(
    rng: np.random.Generator,
    seed: int,
    *,
    vocab: int,
    features: int,
    hidden: int,
    width: int,
    prompts: int,
) -> MLPInstance:
    """Return a random MLP-feature model (``nnx.Rngs(seed)``, float64) and pairs drawn by ``rng``.

    Features are standard normal; ``y_pos`` is uniform over the vocabulary and ``y_neg =
    (y_pos + k) mod V`` with ``k`` uniform in ``[1, V)``, so the two always differ.

    Raises:
      ValueError: ``vocab < 2`` (no pair), or a size below 1 (the model's checks).

    Example:
      >>> m = mlp_instance(np.random.default_rng(0), 0, vocab=5, features=3, hidden=4, width=6,
      ...                  prompts=2)
      >>> m.x.shape, bool(jnp.all(m.y_pos != m.y_neg)), m.model.unembedding.shape
      ((2, 3), True, (5, 4))
    """
    if vocab < 2:
        raise ValueError(f"vocab must be >= 2 (a pair needs two tokens), got vocab={vocab}")
    rngs = nnx.Rngs(seed)
    model = MLPFeatures(vocab, features, hidden, width=width, rngs=rngs, dtype=jnp.float64)
    x = jnp.asarray(rng.normal(size=(prompts, features)))
    y_pos = jnp.asarray(rng.integers(0, vocab, prompts))
    y_neg = (y_pos + jnp.asarray(rng.integers(1, vocab, prompts))) % vocab
    return MLPInstance(model, x, y_pos, y_neg)


class AnswerVelocities(NamedTuple):
    r"""Velocities :math:`\frac{d}{dt}\ln\pi(z|x)` at ``t = 0``, ``[R, V]`` (one row a run).

    Attributes:
      predicted: Theorems 4/5 with the model's own ``W`` and ``h`` (unconstrained features).
      actual: the architecture's velocity, ``jax.jvp`` of the log-probs along
        :math:`-\nabla L` of the actual loss (every parameter moves).
    """

    predicted: np.ndarray
    actual: np.ndarray


def answer_velocities(
    model: CausalTransformer, loss: Any, pairs: TransformerPairs, *, prompt_len: int
) -> AnswerVelocities:
    r"""Return Theorems 4/5's velocity and the true one, per single-token pair at ``t = 0``.

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = -\ell'\big[(e_z - \pi)^\top W (W_{y^+} - W_{y^-}) + \|h\|^2
       (\mathbb{1}[z = y^+] - \pi_{y^+} - \mathbb{1}[z = y^-] + \pi_{y^-})\big]

    with ``W`` the model's unembedding, ``h`` its hidden state at position ``prompt_len - 1``
    and :math:`\ell'` at the reference margin (the reference is the model itself). Each pair is
    its own run (loss on that pair alone); every run has the same answers :math:`y^\pm` (one
    prompt per run, as in the §3 protocol).

    Source: Razin et al. 2024, Theorems 4-5 (:func:`theory.single_token.logprob_velocity`); the
    truth is :func:`sims.flows.core.velocity_along_flow`.

    Args:
      model: the transformer (its reference log-probs are in ``pairs``).
      loss: a per-pair loss of :mod:`theory.losses` (``make_loss("dpo", beta=0.1)``).
      pairs: ``[R]`` pairs whose chosen / rejected answers are the one token at ``prompt_len``,
        the same two tokens in every pair.
      prompt_len: ``P``, the prompts' common length.

    Returns:
      :class:`AnswerVelocities`.
    """
    P = prompt_len
    chosen, rejected = (np.asarray(b.tokens)[:, P] for b in (pairs.chosen, pairs.rejected))
    if np.any(chosen != chosen[0]) or np.any(rejected != rejected[0]):
        raise ValueError(
            f"pairs must share one answer pair (y+, y-) at position prompt_len={P}, got chosen "
            f"{chosen.tolist()}, rejected {rejected.tolist()}"
        )
    y_pos, y_neg = int(chosen[0]), int(rejected[0])
    ref = (pairs.ref_logprob_chosen, pairs.ref_logprob_rejected)
    ell = margin_derivative(loss, *ref, *ref)  # [R]
    h = model.hidden_states(jnp.asarray(pairs.chosen.tokens)[:, :P])[:, P - 1]  # [R, d]
    W = model.unembedding_matrix()
    predicted = jax.vmap(logprob_velocity, in_axes=(None, 0, None, None, 0))(
        W, h, y_pos, y_neg, ell
    )
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], pairs)  # [R, 1, ...]: one pair a run
    objective, query = PairObjective(loss), AnswerLogprobs(P)
    actual = jax.vmap(lambda one: velocity_along_flow(model, objective, one, query, one))(stacked)
    return AnswerVelocities(np.asarray(predicted), np.asarray(actual))


def mlp_hidden(model: nnx.Module, x: jax.Array) -> jax.Array:
    """Return ``h`` of an :class:`~sims.models.unconstrained.MLPFeatures` at features ``x``."""
    return model.hidden(x)


def answer_hidden(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Return the final hidden state of a causal transformer at the last token of ``tokens``."""
    return model.hidden_states(tokens)[-1]


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _measure(graphdef, hidden_fn, loss, tied, state, x, y_pos, y_neg):
    """Truth, its channels, K (and tied cross terms), h, l' for the pair(s) at prompt(s) ``x``."""
    model = nnx.merge(graphdef, state)
    W = model.unembedding_matrix()
    name = "embed.embedding" if tied else "unembedding"
    rows = jnp.arange(jnp.size(y_pos))

    def logprobs(m):  # [V] for one prompt, [N, V] for several
        return jax.nn.log_softmax(hidden_fn(m, x) @ m.unembedding_matrix().T, axis=-1)

    ref = jax.lax.stop_gradient(logprobs(model)).reshape(-1, W.shape[0])  # ref = model at t = 0

    def loss_fn(m):
        lp = logprobs(m).reshape(-1, W.shape[0])
        return mean_pair_loss(
            loss, lp[rows, y_pos], lp[rows, y_neg], ref[rows, y_pos], ref[rows, y_neg]
        )

    channels = velocity_channels(logprobs, loss_fn, model, unembedding=name)
    lp = ref[rows, y_pos], ref[rows, y_neg]
    ell = margin_derivative(loss, *lp, *lp).reshape(jnp.shape(y_pos))
    K = hidden_kernel(lambda m: hidden_fn(m, x), model)
    h = hidden_fn(model, x)
    if tied:
        cross = tied_cross_terms(lambda m: hidden_fn(m, x), model, y_pos, y_neg, unembedding=name)
    else:
        cross = (jnp.zeros_like(h), jnp.zeros(W.shape[0]))  # untied: b = 0, r = 0
    return channels, K, tuple(cross), h, ell, W


def _predict(W, h, K, cross, y_pos, y_neg, ell, *, tied):
    """The forms for one prompt (vmapped by the caller); tied: with and without cross terms."""
    preds = {
        "kernel": tk.kernel_logprob_velocity(W, h, K, y_pos, y_neg, ell),
        "free_h": logprob_velocity(W, h, y_pos, y_neg, ell),
    }
    if tied:
        preds["kernel_no_cross"] = preds["kernel"]
        preds["kernel"] = tk.tied_kernel_logprob_velocity(W, h, K, *cross, y_pos, y_neg, ell)
    return preds


def compare_velocities(pred: Any, truth: Any, y_pos: Any, *, sign_tol: float) -> dict[str, Any]:
    r"""Return the comparison table of predicted and true velocities, one row per prompt.

    Per row ``i`` (prompt) with scale :math:`s_i = \max_z |\mathrm{truth}_{iz}|`:

    * ``rel_err`` ``[R]``: :math:`\max_z |\mathrm{pred}_{iz} - \mathrm{truth}_{iz}| / s_i`;
    * ``sign_agree_clear`` / ``sign_clear``: entries with :math:`|\mathrm{truth}| > `
      ``sign_tol`` :math:`s_i` whose signs agree / all such entries;
    * ``gain_agree_clear`` / ``gain_clear``: the same for the gain over :math:`y^+`,
      :math:`\frac{d}{dt}(\ln\pi_z - \ln\pi_{y^+})` (clear where the true gain is);
    * ``sign_agree_all_tokens``: the fraction of all entries with equal signs (no tolerance);
    * ``correlation`` ``[R]``: Pearson per row (``None`` with ``correlation_undefined_reason``
      where undefined, :func:`sims.analysis.summaries.statistic_per_row`).

    Args:
      pred, truth: ``[R, V]`` (or ``[V]``: one row).
      y_pos: ``[R]`` (or scalar) preferred token id of each row.
      sign_tol: relative threshold of a clear sign, ``>= 0``.

    Returns:
      dict of plain numbers and lists (JSON-ready).

    Raises:
      ValueError: ``pred`` and ``truth`` of different shapes, or ``sign_tol < 0``.

    Example:
      >>> t = compare_velocities([[1.0, -2.0, 0.5]], [[1.0, -1.0, -0.5]], [0], sign_tol=0.1)
      >>> t["rel_err"], t["sign_agree_clear"], t["sign_clear"], t["gain_clear"]
      ([1.0], 2, 3, 2)
    """
    pred, truth = np.atleast_2d(pred), np.atleast_2d(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have one shape, got {pred.shape}, {truth.shape}")
    if not sign_tol >= 0:
        raise ValueError(f"sign_tol must be >= 0, got sign_tol={sign_tol}")
    rows = np.arange(truth.shape[0])
    y_pos = np.atleast_1d(np.asarray(y_pos))
    size = np.max(np.abs(truth), axis=1, keepdims=True)
    out: dict[str, Any] = {"rel_err": (np.max(np.abs(pred - truth), axis=1) / size[:, 0]).tolist()}
    for key, p, t in (
        ("sign", pred, truth),
        ("gain", pred - pred[rows, y_pos][:, None], truth - truth[rows, y_pos][:, None]),
    ):
        clear = np.abs(t) > sign_tol * size
        out[f"{key}_agree_clear"] = int(np.sum((np.sign(p) == np.sign(t)) & clear))
        out[f"{key}_clear"] = int(np.sum(clear))
    out["sign_agree_all_tokens"] = float(np.mean(np.sign(pred) == np.sign(truth)))
    out |= statistic_per_row("correlation", pearson, list(zip(pred, truth, strict=True)))
    return out


def kernel_form_check(
    model: nnx.Module,
    hidden_fn: Callable[[nnx.Module, jax.Array], jax.Array],
    x: jax.Array,
    y_pos: jax.Array,
    y_neg: jax.Array,
    *,
    beta: float,
    sign_tol: float,
    tied: bool = False,
    joint: bool = False,
    sets: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    r"""Return the check table of one model: each form's :func:`compare_velocities` and more.

    The reference is the model at ``t = 0`` (so :math:`\ell' = -\beta/2` for DPO). Per prompt
    ``x[i]`` the loss is DPO on the pair ``(y_pos[i], y_neg[i])`` alone; with ``joint`` it is
    the mean DPO loss over every prompt's pair, and the forms are the multi-sample ones
    (Theorems 8-9 and :func:`theory.kernel.multi_sample_kernel_logprob_velocity`).

    Source: Razin et al. 2024, Theorems 4-5 (free-h form) and Eq. 7 without unconstrained
    features (:mod:`theory.kernel`, the kernel form).

    Args:
      model: float64 NNX model with ``unembedding_matrix()`` (an ``unembedding`` parameter, or
        ``embed.embedding`` when ``tied``).
      hidden_fn: ``(model, x_i) -> h`` ``[d]`` (:func:`mlp_hidden`, :func:`answer_hidden`);
        hashable (a module-level function: it keys the compiled measurement).
      x: ``[R, ...]`` prompts; y_pos, y_neg: ``[R]`` token ids.
      beta: DPO KL coefficient; sign_tol: as :func:`compare_velocities`.
      tied: the unembedding is the input embedding (adds ``"kernel_no_cross"``).
      joint: one mean loss over all prompts (untied models).
      sets: two token-id sets (e.g. the persona answer sets) whose centroids give
        ``lambda_eff_sets`` (per-prompt runs only).

    Returns:
      ``{form: table}`` for each form; ``truth`` ``[R, V]`` and ``points_<form>`` ``[R, V]``
      (velocities over :math:`\max_z|\mathrm{truth}|` per prompt, for scatter plots);
      ``unembedding_channel_share`` (mean over prompts of :math:`\max_z` of the unembedding
      channel over :math:`\max_z|\mathrm{truth}|`); per-prompt runs also ``lambda_eff_pair``
      ``[R]`` (:func:`theory.kernel.kernel_anisotropy` of ``K`` along
      :math:`W_{y^+} - W_{y^-}`) and, with ``sets``, ``lambda_eff_sets`` ``[R]``.
    """
    loss = make_loss("dpo", beta=beta)
    graphdef, state = nnx.split(model)
    if joint:
        ch, K, cross, h, ell, W = _measure(graphdef, hidden_fn, loss, tied, state, x, y_pos, y_neg)
        preds = {
            "kernel": tk.multi_sample_kernel_logprob_velocity(W, h, K, y_pos, y_neg, ell),
            "free_h": multi_sample_logprob_velocity(W, h, y_pos, y_neg, ell),
        }
    else:
        measure = jax.vmap(_measure, in_axes=(None, None, None, None, None, 0, 0, 0))
        ch, K, cross, h, ell, W = measure(graphdef, hidden_fn, loss, tied, state, x, y_pos, y_neg)
        W = W[0]
        preds = jax.jit(jax.vmap(partial(_predict, tied=tied), in_axes=(None, 0, 0, 0, 0, 0, 0)))(
            W, h, K, cross, y_pos, y_neg, ell
        )
    truth = np.asarray(ch.total)
    y = np.asarray(y_pos)
    out = {form: compare_velocities(p, truth, y, sign_tol=sign_tol) for form, p in preds.items()}
    out["truth"] = truth.reshape(-1, truth.shape[-1]) / np.max(np.abs(truth), -1).reshape(-1, 1)
    for form, p in preds.items():  # per-prompt normalised points for the scatter plots
        out[f"points_{form}"] = np.asarray(p).reshape(truth.shape) / np.max(
            np.abs(truth), -1, keepdims=True
        )
    out["unembedding_channel_share"] = float(
        np.mean(np.max(np.abs(ch.unembedding), -1) / np.max(np.abs(truth), -1))
    )
    if not joint:
        U = W[y_pos] - W[y_neg]  # [R, d]
        out["lambda_eff_pair"] = np.asarray(jax.vmap(tk.kernel_anisotropy)(K, U[:, None]).ratio)
        if sets is not None:
            S = jnp.stack([jnp.mean(W[jnp.asarray(s)], 0) for s in sets])  # [2, d] centroids
            out["lambda_eff_sets"] = np.asarray(
                jax.vmap(tk.kernel_anisotropy, in_axes=(0, None))(K, S).ratio
            )
    return out


def check_text(table: dict[str, Any]) -> str:
    """Return one line per :func:`kernel_form_check` table: each form's largest relative error
    and clear signs right."""
    return ", ".join(
        f"{f} rel err {max(table[f]['rel_err']):.1e} signs {table[f]['sign_agree_clear']}/"
        f"{table[f]['sign_clear']}"
        for f in FORMS
        if f in table
    )


def check_summary(families: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Return ``{"<family>/<form>": pooled numbers}`` over each family's tables.

    Pooled: ``max_rel_err`` (largest over prompts), the :data:`COUNTS` (sums),
    ``sign_agree_all_tokens`` (mean over tables), ``min_correlation`` / ``mean_correlation``
    over the defined per-prompt correlations (``None`` when none is defined).

    Example:
      >>> table = {"rel_err": [1e-16, 3e-16], "sign_agree_clear": 4, "sign_clear": 4,
      ...          "gain_agree_clear": 3, "gain_clear": 4, "sign_agree_all_tokens": 1.0,
      ...          "correlation": [1.0, None]}
      >>> s = check_summary({"mlp": [{"kernel": table}, {"kernel": table}]})["mlp/kernel"]
      >>> s["max_rel_err"], s["sign_clear"], s["gain_agree_clear"], s["mean_correlation"]
      (3e-16, 8, 6, 1.0)
    """
    summary = {}
    for label, outs in families.items():
        for form in (f for f in FORMS if f in outs[0]):
            cells = [o[form] for o in outs]
            defined = [r for c in cells for r in c["correlation"] if r is not None]
            summary[f"{label}/{form}"] = {
                "max_rel_err": max(max(c["rel_err"]) for c in cells),
                **{k: sum(c[k] for c in cells) for k in COUNTS},
                "sign_agree_all_tokens": float(
                    np.mean([c["sign_agree_all_tokens"] for c in cells])
                ),
                "min_correlation": min(defined, default=None),  # None: none defined
                "mean_correlation": float(np.mean(defined)) if defined else None,
            }
    return summary


def summary_text(summary: dict[str, dict[str, Any]]) -> str:
    """Return a :func:`check_summary` on one line: per entry the largest relative error, clear
    signs right and the mean correlation."""
    return "; ".join(
        f"{k}: err {v['max_rel_err']:.1e}, signs {v['sign_agree_clear']}/{v['sign_clear']}, "
        f"corr {statistic_text(v['mean_correlation'], '.2f')}"
        for k, v in summary.items()
    )


def kernel_verdict(summary: dict[str, dict[str, Any]]) -> str:
    """Return ``"reproduced"`` if every ``*/kernel`` entry of a :func:`check_summary` has
    ``max_rel_err <= MAX_REL_ERR`` and every clear sign right, else ``"not reproduced"``.

    Example:
      >>> kernel_verdict({"m/kernel": {"max_rel_err": 2e-16, "sign_agree_clear": 5,
      ...                              "sign_clear": 5}})
      'reproduced'
    """
    kernel = [v for k, v in summary.items() if k.endswith("/kernel")]
    reproduced = all(
        s["max_rel_err"] <= MAX_REL_ERR and s["sign_agree_clear"] == s["sign_clear"] for s in kernel
    )
    return "reproduced" if reproduced else "not reproduced"
