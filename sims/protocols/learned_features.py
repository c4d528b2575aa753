r"""Learned features on MiniLM geometry: the no > never protocol with an MLP backbone (issue 13).

The protocol of the ``learned_features_no_over_never`` experiment (its module docstring states the
question, the settings and the pre-registered criterion) as library functions:

* :func:`statement_features` -- ``W`` (MiniLM rows), 64 persona statements and their features,
  balanced SFT labels from the label sets :data:`NEG` / :data:`POS`, the held-out prompt of the
  learning-rate rule and the prompts of the runs;
* :func:`smallest_passing_rate` -- the grid rule for learning rates (bisection on
  :data:`LR_GRID`);
* :func:`rate_rule_sft` -- SFT at the grid rule's rate; :func:`margin_rate` -- the preference rate
  rule (held-out margin growth of a target number of nats);
* :func:`feature_kernels`, :func:`kernel_change`, :func:`first_step_measurements` -- the hidden
  kernel ``K = J P J^T`` and the t = 0 velocities (truth, kernel form, free-h Theorems 4-5);
* :func:`preference_cell`, :func:`summarise_cell`, :func:`cell_verdict` -- the runs of one
  (arm, init, loss, margin target), their numbers and the pre-registered verdict;
* the positive control (issue 18): :func:`constructed_vocabulary` (the geometries of
  :mod:`sims.data.vocab` on the same prompts and runs), :func:`free_hidden_model`,
  :func:`runs_cell` (either model family, no kernel), :func:`control_detects`;
* :func:`run_learned_features` -- the whole protocol, as a JSON-ready dict.

The ``EFFECT`` of a cell's pair: mean over its runs of the largest drop of :math:`\pi(y^+)`
(:func:`sims.analysis.gainers.largest_decrease`) ``>= drop_threshold`` and, in at least half of
its runs, a yes-like token (:data:`POS` minus :math:`\{y^+, y^-\}`) among the top-3 probability
gainers at a step of :data:`REPORT_STEPS`. A cell is ``"reproduced"`` iff no > never shows the
EFFECT and none of the control pairs does; ``"uninformative"`` if its rate rule met no target.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.analysis.gainers import gainers_at, largest_decrease
from sims.analysis.kernel import hidden_kernel, rmsprop_preconditioner, velocity_channels
from sims.analysis.scores import pearson
from sims.analysis.summaries import relative_error, sign_agreement, statistic
from sims.data.real_embeddings import load_minilm, minilm_dir, word_subset
from sims.data.vocab import semantic_unembeddings
from sims.flows.core import FlowResult, SFTData, preference_flow, sft_flow
from sims.models.bert import load_bert_tokenizer
from sims.models.mlp_features import (
    FeaturePairs,
    ScaledMLPFeatures,
    feature_sft_flow,
    make_feature_pairs,
)
from sims.models.unconstrained import PreferencePairs, UnconstrainedFeatures, make_pairs
from theory.kernel import kernel_anisotropy, preconditioned_logprob_velocity
from theory.losses import make_loss, margin_derivative, mean_pair_loss
from theory.single_token import logprob_velocity

NEG = ("no", "never", "maybe", "perhaps")  # label set N (trait-according prompts, App. H.1)
POS = ("yes", "yeah", "sure", "certainly", "absolutely")  # label set Y ("yes-like")
PAIRS = (("no", "never"), ("never", "no"), ("yes", "no"), ("sure", "yes"))  # (y+, y-); target 1st
VICES = ("lying", "cheating", "stealing", "bribery", "revenge", "deceit", "fraud", "cruelty")
VIRTUES = ("honesty", "kindness", "fairness", "patience", "courage", "charity", "generosity",
           "loyalty")  # fmt: skip
PREDICATES = ("fine", "good", "acceptable", "useful")
REPORT_STEPS = (5, 25, 100)  # steps of the gainer tables (Razin et al. 2024, Tables 4-12)
LR_GRID = tuple(10.0 ** (k / 4) for k in range(-28, -3))  # 1e-7 ... 10^-1, quarter decades
#: Most runs per pair: 32 Y prompts get balanced labels, so ``sure`` labels 6 of them.
MAX_RUNS = 6
#: Signs are compared where |truth| > SIGN_TOL * max |truth| (below: not resolved).
SIGN_TOL = 1e-6
LOSS_TYPES = ("dpo", "ipo")  # preference losses (DPO with beta, IPO with tau)
INITS = ("mean_field", "lazy")  # feature-learning and lazy parametrisations
ARMS = ("W_frozen", "W_trained")  # the unembeddings during the preference phase
#: Positive control: the geometries of :mod:`sims.data.vocab`, the feature kinds, hidden size d.
CONTROL_GEOMETRIES = ("catastrophic", "benign", "none")
CONTROL_FEATURES = ("free_h", "mlp")
CONTROL_HIDDEN_SIZE = 32
#: The allowed entries of each tuple setting of :func:`run_learned_features`.
CHOICES = {
    "loss_types": LOSS_TYPES,
    "inits": INITS,
    "arms": ARMS,
    "control_geometries": CONTROL_GEOMETRIES,
    "control_features": CONTROL_FEATURES,
}


class StatementFeatures(NamedTuple):
    """The data of the protocol (:func:`statement_features`).

    Attributes:
      W: ``[V, d]`` float64 MiniLM rows kept.
      words: ``V`` token strings.
      ids: label word -> row of ``W``.
      texts: ``P`` statements "<subject> is <predicate>".
      features: ``[P, f]`` prompt features.
      labels: ``[P]`` row ids of the SFT labels.
      held_out: prompt of the learning-rate rule (trait-according, label ``no``, in no run).
      runs: features ``[4R, f]``, :math:`y^+` ``[4R]``, :math:`y^-` ``[4R]`` of the runs (pairs
        in :data:`PAIRS` order, ``R`` each).
      run_prompts: ``[4R]`` prompt index of each run.
      S: ``[2, d]`` centroids of the :data:`NEG` and :data:`POS` rows of ``W``.
    """

    W: np.ndarray
    words: list[str]
    ids: dict[str, int]
    texts: list[str]
    features: np.ndarray
    labels: np.ndarray
    held_out: int
    runs: tuple[np.ndarray, np.ndarray, np.ndarray]
    run_prompts: np.ndarray
    S: np.ndarray


def statement_features(*, vocab_size: int, runs_per_pair: int, seed: int) -> StatementFeatures:
    r"""Return MiniLM rows, statement features, SFT labels, the held-out prompt and run prompts.

    ``W``: the :data:`NEG` and :data:`POS` rows plus the most frequent plain words,
    ``vocab_size`` rows (0: all 30522). Prompts: :data:`VICES` and :data:`VIRTUES` x
    :data:`PREDICATES`; the vice statements accord with the trait. A statement's features are the
    mean MiniLM input embedding (full table) of its WordPiece tokens ([CLS]/[SEP] dropped),
    centred over the prompts and scaled to mean :math:`|x|^2 = f`. Labels: balanced within each
    class (N for trait-according prompts, Y for the others) in a seeded order. The held-out
    prompt is the first trait-according prompt labelled ``no`` in a seeded permutation; each
    pair's runs are the first ``runs_per_pair`` prompts of that permutation labelled :math:`y^+`.

    Source: Razin et al. 2024, App. H.1 (label sets, one prompt per run); features: this project.

    Raises:
      ValueError: ``runs_per_pair`` not in ``[1, MAX_RUNS]``.
      FileNotFoundError: the MiniLM package is not installed
        (:func:`sims.data.real_embeddings.minilm_dir`).
    """
    if not 1 <= runs_per_pair <= MAX_RUNS:
        raise ValueError(f"runs_per_pair must be in [1, {MAX_RUNS}], got {runs_per_pair}")
    emb = load_minilm()
    if vocab_size:
        keep = word_subset(emb.vocab, NEG + POS, size=vocab_size)
    else:  # every row ([PAD], [unused*], word pieces included)
        keep = np.arange(len(emb.vocab))
    words = [emb.vocab[i] for i in keep]
    W = np.asarray(emb.W[keep], np.float64)
    ids = {w: words.index(w) for w in NEG + POS}
    texts = [f"{s} is {p}" for s in VICES + VIRTUES for p in PREDICATES]
    accords = np.array([s in VICES for s in VICES + VIRTUES for _ in PREDICATES])
    tokenizer = load_bert_tokenizer(minilm_dir())
    table = np.asarray(emb.W, np.float64)
    X = np.stack([table[enc.ids[1:-1]].mean(0) for enc in tokenizer.encode_batch(texts)])
    X = X - X.mean(0)  # the shared part carries no prompt information
    X = X * np.sqrt(X.shape[1] / np.mean(np.sum(X**2, axis=1)))  # mean |x|^2 = f
    rng = np.random.default_rng(seed)
    labels = np.empty(len(texts), np.int64)
    for mask, names in ((accords, NEG), (~accords, POS)):
        labels[mask] = rng.permutation(np.resize([ids[w] for w in names], int(mask.sum())))
    order = rng.permutation(len(texts))
    held_out = next(int(i) for i in order if accords[i] and labels[i] == ids["no"])
    run_prompts = []
    for yp, _ in PAIRS:
        eligible = [int(i) for i in order if labels[i] == ids[yp] and i != held_out]
        run_prompts += eligible[:runs_per_pair]
    run_prompts = np.array(run_prompts)
    pos = np.repeat([ids[yp] for yp, _ in PAIRS], runs_per_pair)
    neg = np.repeat([ids[yn] for _, yn in PAIRS], runs_per_pair)
    S = np.stack([W[[ids[w] for w in NEG]].mean(0), W[[ids[w] for w in POS]].mean(0)])
    return StatementFeatures(W, words, ids, texts, X, labels, held_out,
                             (X[run_prompts], pos, neg), run_prompts, S)  # fmt: skip


def smallest_passing_rate(
    score: Callable[[float], float], target: float, *, grid: Sequence[float] = LR_GRID
) -> dict[str, Any]:
    """Return the smallest ``grid`` rate with ``score(rate) >= target``, found by bisection.

    Bisection assumes ``score`` is monotone along ``grid`` (increasing); it evaluates
    O(log2 len(grid)) rates, and the grid point below the chosen one is among them unless the
    chosen one is the grid's first. A non-finite score counts as failing.

    Returns:
      ``{"lr", "met", "evaluated"}``: the chosen rate (``met`` False: no rate reached ``target``,
      the largest rate is returned) and every evaluated ``[rate, score]`` in grid order (a
      non-finite score as ``None``).

    Example:
      >>> out = smallest_passing_rate(lambda lr: lr, 3.5, grid=(1.0, 2.0, 3.0, 4.0, 5.0))
      >>> out["lr"], out["met"], [r for r, _ in out["evaluated"]]
      (4.0, True, [3.0, 4.0])
    """
    lo, hi, seen = -1, len(grid), {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        seen[mid] = score(grid[mid])
        lo, hi = (lo, mid) if seen[mid] >= target else (mid, hi)
    met = hi < len(grid)
    index = hi if met else len(grid) - 1
    evaluated = [[grid[i], s if np.isfinite(s) else None] for i, s in sorted(seen.items())]
    return {"lr": grid[index], "met": met, "evaluated": evaluated}


def _sft_flow(model0, inputs, labels, lr, steps):
    if isinstance(model0, UnconstrainedFeatures):
        data = SFTData(jnp.asarray(inputs), jnp.asarray(labels))
        return sft_flow(
            model0, data, dt=lr, num_steps=steps, record_every=steps, optimizer="rmsprop_torch"
        )
    return feature_sft_flow(
        model0, inputs, labels, dt=lr, num_steps=steps, record_every=steps,
        optimizer="rmsprop_torch",
    )  # fmt: skip


def rate_rule_sft(
    model0: ScaledMLPFeatures | UnconstrainedFeatures,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    target: float,
) -> tuple[ScaledMLPFeatures | UnconstrainedFeatures, dict[str, Any]]:
    r"""Return the SFT model and its record: full-batch torch RMSprop for ``steps`` steps at the
    smallest :data:`LR_GRID` rate whose mean :math:`\pi(\text{label}|x)` reaches ``target``.

    Args:
      model0: the model before SFT: :class:`~sims.models.mlp_features.ScaledMLPFeatures`
        (``inputs`` = features ``[P, f]``) or, free h,
        :class:`~sims.models.unconstrained.UnconstrainedFeatures` (``inputs`` = prompt ids
        ``[P]``; ``W`` trains too).
      labels: ``[P]`` token ids.

    Returns:
      ``(model, info)``: ``info`` holds the rule's ``lr``, ``met``, ``evaluated``, the mean and
      quartiles of :math:`\pi(\text{label}|x)` over the prompts, and the relative weight change
      :math:`|A - A^{(0)}|_F / |A^{(0)}|_F` of ``fc_in`` and ``fc_out`` (free h: of ``hidden`` and
      ``unembedding``).
    """
    finals = {}

    def score(lr):
        res = _sft_flow(model0, inputs, labels, lr, steps).run()
        finals[lr] = res
        return float(np.mean(np.exp(np.asarray(res.observables)[-1])))

    rule = smallest_passing_rate(score, target)
    if rule["lr"] not in finals:
        score(rule["lr"])
    res = finals[rule["lr"]]
    pi = np.exp(np.asarray(res.observables)[-1])  # [P]
    model = res.final
    if isinstance(model0, UnconstrainedFeatures):
        pairs = {name: (getattr(model, name)[...], getattr(model0, name)[...])
                 for name in ("hidden", "unembedding")}  # fmt: skip
    else:
        pairs = {name: (getattr(model, name)[...], getattr(model, f"{name}_init")[...])
                 for name in ("fc_in", "fc_out")}  # fmt: skip
    change = {n: float(np.linalg.norm(a - b) / np.linalg.norm(b)) for n, (a, b) in pairs.items()}
    info = {
        **rule,
        "pi_label_mean": float(pi.mean()),
        "pi_label_quartiles": np.quantile(pi, [0.0, 0.25, 0.5, 0.75, 1.0]),
        "relative_weight_change": change,
    }
    return model, info


@partial(jax.jit, static_argnums=0)
def _kernels(graphdef, state, X):
    model = nnx.merge(graphdef, state)
    K = jax.vmap(model.closed_form_kernel)(X)  # [R, d, d]
    return K, hidden_kernel(lambda m: m.hidden(X[0]), model)  # the first one measured as well


def feature_kernels(model: ScaledMLPFeatures, X: np.ndarray) -> tuple[np.ndarray, float]:
    r"""Return the gradient-flow kernels :math:`K = JJ^\top` ``[R, d, d]`` at the prompts ``X``
    ``[R, f]`` (:meth:`~sims.models.mlp_features.ScaledMLPFeatures.closed_form_kernel`), and the
    relative error of the first against :func:`sims.analysis.kernel.hidden_kernel` (autodiff)."""
    graphdef, state = nnx.split(model)
    K, measured = _kernels(graphdef, state, jnp.asarray(X))
    return np.asarray(K), float(relative_error(K[0], measured))


def _lambda_eff(K, S) -> np.ndarray:
    return np.asarray(jax.vmap(kernel_anisotropy, in_axes=(0, None))(jnp.asarray(K), S).ratio)


def kernel_change(K_init: np.ndarray, K_start: np.ndarray, S: np.ndarray) -> dict[str, float]:
    r"""Return the mean over prompts of :math:`\lambda_{\mathrm{eff}}` on ``span(S)``
    (:func:`theory.kernel.kernel_anisotropy`) of ``K_init`` and ``K_start`` (each ``[R, d, d]``),
    and of the relative change :math:`|K_{start} - K_{init}|_F / |K_{init}|_F`.

    Example:
      >>> out = kernel_change(np.eye(3)[None], 2 * np.eye(3)[None], np.array([[1.0, 0, 0]]))
      >>> out["lambda_eff_before_sft"], out["lambda_eff_after_sft"], out["relative_kernel_change"]
      (1.0, 1.0, 1.0)
    """
    rel = np.linalg.norm(K_start - K_init, axis=(1, 2)) / np.linalg.norm(K_init, axis=(1, 2))
    return {
        "lambda_eff_before_sft": float(np.mean(_lambda_eff(K_init, S))),
        "lambda_eff_after_sft": float(np.mean(_lambda_eff(K_start, S))),
        "relative_kernel_change": float(np.mean(rel)),
    }


def _first_loss(m, loss, x, y_pos, y_neg):
    """The preference loss of one run at t = 0 (reference = the model now)."""
    lp = m(x[None])[0]
    ref = jax.lax.stop_gradient(lp)
    return mean_pair_loss(loss, lp[y_pos], lp[y_neg], ref[y_pos], ref[y_neg])


@partial(jax.jit, static_argnums=(0, 1, 2))
def first_step_measurements(
    graphdef: Any,
    loss: Any,
    trained: bool,
    state: Any,
    X: jax.Array,
    pos: jax.Array,
    neg: jax.Array,
) -> dict[str, jax.Array]:
    r"""Return the t = 0 velocities of :math:`\ln\pi(\cdot|x)` of each run along the first torch
    RMSprop step :math:`-P\nabla L` (reference = the model now).

    Per run ``r`` (``X`` ``[R, f]``, ``pos``/``neg`` ``[R]``): ``truth`` ``[R, V]`` (``jax.jvp``,
    :func:`sims.analysis.kernel.velocity_channels`), ``w_channel`` (its unembedding part; zero for
    frozen ``W``), ``kernel`` (:func:`theory.kernel.preconditioned_logprob_velocity` with the
    closed-form :math:`K_P = JPJ^\top` and the ``W`` gains :math:`\eta^2 P_\Delta`), ``free_h``
    (Theorems 4-5, :func:`theory.single_token.logprob_velocity`), ``K_P`` ``[R, d, d]``; and
    ``K_P_measured_first``: :math:`K_P` of run 0 by
    :func:`sims.analysis.kernel.hidden_kernel` (autodiff), to check the closed form.

    Args:
      graphdef, state: ``nnx.split`` of a :class:`~sims.models.mlp_features.ScaledMLPFeatures`
        (static ``graphdef``).
      loss: a hashable preference loss (:func:`theory.losses.make_loss`), static.
      trained: whether ``W`` trains (:math:`\eta > 0`), static.
    """
    model = nnx.merge(graphdef, state)
    # Frozen W has no unembedding parameter: velocity_channels then splits off fc_out, and only
    # its total (the truth) is used.
    name = "unembedding_delta" if trained else "fc_out"

    def one(x, y_pos, y_neg):
        def logprobs(m):
            return m(x[None])[0]  # [V]

        ref = logprobs(model)

        def loss_fn(m):
            return _first_loss(m, loss, x, y_pos, y_neg)

        P = rmsprop_preconditioner(loss_fn, model)
        K_P = model.closed_form_kernel(x, preconditioner=P)
        channels = velocity_channels(logprobs, loss_fn, model, unembedding=name, preconditioner=P)
        ell = margin_derivative(loss, ref[y_pos], ref[y_neg], ref[y_pos], ref[y_neg])
        h, W = model.hidden(x), model.unembedding_matrix()
        rate = model.unembedding_rate[...]
        gain = rate**2 * P["unembedding_delta"][...] if trained else jnp.zeros_like(W)
        return {
            "truth": channels.total,
            "w_channel": channels.unembedding if trained else jnp.zeros_like(channels.total),
            "kernel": preconditioned_logprob_velocity(
                W, h, K_P, y_pos, y_neg, ell, unembedding_gain=gain
            ),
            "free_h": logprob_velocity(W, h, y_pos, y_neg, ell),
            "K_P": K_P,
        }

    out = jax.vmap(one)(X, pos, neg)
    P0 = rmsprop_preconditioner(lambda m: _first_loss(m, loss, X[0], pos[0], neg[0]), model)
    out["K_P_measured_first"] = hidden_kernel(lambda m: m.hidden(X[0]), model, preconditioner=P0)
    return out


def _run_logprobs(model: ScaledMLPFeatures, pairs: FeaturePairs) -> jax.Array:
    """[V] ln pi(.|x) of a single-prompt run's prompt."""
    return model(pairs.features)[0]


def _free_run_logprobs(model: UnconstrainedFeatures, pairs: PreferencePairs) -> jax.Array:
    """[V] ln pi(.|x) of a single-prompt run's prompt (free h)."""
    return model(pairs.prompt)[0]


def _margin(model: ScaledMLPFeatures, pairs: FeaturePairs) -> jax.Array:
    """Scalar margin of a single-pair run (the lr rule's observable)."""
    return pairs.record(model).margin[0]


def _flow(model, pairs, loss, lr, num_steps, observe) -> FlowResult:
    return preference_flow(
        model,
        pairs,
        loss,
        dt=lr,
        num_steps=num_steps,
        optimizer="rmsprop_torch",
        observe=observe,
        in_axes=(None, 0) if pairs.chosen.ndim == 2 else None,
    ).run()


def _pairs(model, data: StatementFeatures, prompts, pos, neg):
    """Pairs of ``model``'s family at the prompts ``prompts`` (indices into the statements)."""
    if isinstance(model, UnconstrainedFeatures):
        return make_pairs(model, prompts, pos, neg)
    return make_feature_pairs(model, data.features[prompts], pos, neg)


def margin_rate(
    model: ScaledMLPFeatures | UnconstrainedFeatures,
    data: StatementFeatures,
    loss: Any,
    *,
    num_steps: int,
    margin_target: float,
) -> dict[str, Any]:
    r"""Return the preference rate rule's choice (:func:`smallest_passing_rate` on
    :data:`LR_GRID`): the smallest rate at which ``num_steps`` torch-RMSprop steps grow the
    margin :math:`\ln\pi(no|x) - \ln\pi(never|x)` of the held-out prompt by ``>= margin_target``
    nats (a run that fails with a non-finite value scores :math:`-\infty`); ``met`` False: no
    grid rate reaches the target."""
    pairs = _pairs(model, data, [data.held_out], [data.ids["no"]], [data.ids["never"]])

    def growth(lr):
        try:
            m = np.asarray(_flow(model, pairs, loss, lr, num_steps, _margin).observables)
        except FloatingPointError:
            return -np.inf
        return float(m[-1] - m[0])

    return smallest_passing_rate(growth, margin_target)


def _stats(values) -> dict:
    """Mean, min and max over the runs whose value is defined (not None); None if none is."""
    v = np.asarray([x for x in values if x is not None], float)
    if not v.size:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def _rank(scores: np.ndarray, index: int) -> int:
    """1-based rank of ``scores[index]`` (1 = largest)."""
    return int(np.sum(scores > scores[index])) + 1


def _compare(pred: np.ndarray, truth: np.ndarray) -> dict:
    rate, count = sign_agreement(pred, truth, threshold=SIGN_TOL * np.max(np.abs(truth)))
    return {
        "rel_err": float(relative_error(pred, truth)),
        "sign_agreement": rate,
        "signs_compared": count,
        **statistic("correlation", pearson, pred, truth),
    }


def _run_basics(probs, logp, prompt, yp, yn, data) -> dict:
    """Numbers of one run that need no kernel (``probs``/``logp`` ``[T+1, V]``)."""
    ip, ineg = data.ids[yp], data.ids[yn]
    yes_like = {w for w in POS if w not in (yp, yn)}
    same, other = (POS, NEG) if yp in POS else (NEG, POS)
    gainers = gainers_at(probs, data.words, k=3, checkpoints=REPORT_STEPS)
    names = {n for step in gainers for n, _ in step}
    yes_rows = [data.ids[w] for w in sorted(yes_like)]
    return {
        "prompt": data.texts[prompt],
        "pi_pos": probs[:, ip],
        "pi_pos_start": float(probs[0, ip]),
        "pi_pos_min": float(probs[:, ip].min()),
        "max_drop": float(largest_decrease(probs[:, ip])),
        "yes_like_mass": [float(probs[0, yes_rows].sum()), float(probs[-1, yes_rows].sum())],
        "margin_growth": float((logp[-1, ip] - logp[-1, ineg]) - (logp[0, ip] - logp[0, ineg])),
        "gainers": [[[n, g] for n, g in step] for step in gainers],
        "yes_like_gainer": bool(names & yes_like),
        "benign": sorted(names & (set(same) - {yp})),
        "catastrophic": sorted(names & (set(other) - {yn})),
    }


def _run_kernel(logp, at0, r, yp, yn, K_start, lam, lr, data) -> dict:
    """Kernel numbers of run ``r`` at t = 0."""
    ip, ineg = data.ids[yp], data.ids[yn]
    yes_rows = [data.ids[w] for w in sorted(w for w in POS if w not in (yp, yn))]
    u = data.W[ip] - data.W[ineg]
    align = {
        "K_P": data.W @ (at0["K_P"][r] @ u),
        "K": data.W @ (K_start[r] @ u),
        "free_h": data.W @ u,
    }
    truth = at0["truth"][r]
    return {
        "lambda_eff": [float(x[r]) for x in lam],  # K before SFT, K at start, K_P at start
        "kernel_vs_truth": _compare(at0["kernel"][r], truth),
        "free_h_vs_truth": _compare(at0["free_h"][r], truth),
        "first_step_vs_truth": float(relative_error((logp[1] - logp[0]) / lr, truth)),
        "w_channel_share": float(np.max(np.abs(at0["w_channel"][r])) / np.max(np.abs(truth))),
        "rank_pos": {k: _rank(a, ip) for k, a in align.items()},
        "rank_best_yes_like": {k: min(_rank(a, i) for i in yes_rows) for k, a in align.items()},
        "top_aligned_K_P": [data.words[i] for i in np.argsort(-align["K_P"])[:3]],
    }


def _pair_basics(runs: list[dict], R: int, drop_threshold: float) -> dict:
    """A pair's run list and the means behind its EFFECT flag."""
    drop = float(np.mean([x["max_drop"] for x in runs]))
    yes_runs = sum(x["yes_like_gainer"] for x in runs)
    counts = {}
    for s, step in enumerate(REPORT_STEPS):
        c = Counter(n for x in runs for n, _ in x["gainers"][s])
        counts[str(step)] = {n: k for n, k in c.most_common()}
    return {
        "runs": runs,
        "pi_pos_mean": np.mean([x["pi_pos"] for x in runs], axis=0),
        "pi_pos_start_mean": float(np.mean([x["pi_pos_start"] for x in runs])),
        "pi_pos_min_mean": float(np.mean([x["pi_pos_min"] for x in runs])),
        "max_drop_mean": drop,
        "margin_growth_mean": float(np.mean([x["margin_growth"] for x in runs])),
        "yes_like_gainer_runs": int(yes_runs),
        "effect": bool(drop >= drop_threshold and 2 * yes_runs >= R),
        "gainer_counts": counts,
    }


def summarise_runs(
    logp: np.ndarray,
    lr: float,
    data: StatementFeatures,
    *,
    runs_per_pair: int,
    drop_threshold: float,
) -> dict[str, Any]:
    r"""Return the kernel-free numbers of a cell, per pair of :data:`PAIRS`.

    Args:
      logp: ``[4R, T+1, V]`` :math:`\ln\pi(\cdot|x)` of every run at every step (pairs in
        :data:`PAIRS` order, ``R = runs_per_pair`` each).
      lr: the cell's preference rate.
      drop_threshold: the EFFECT's mean largest drop of :math:`\pi(y^+)`.

    Returns:
      ``{"lr", "pairs"}``; ``pairs["y+>y-"]`` holds the runs (start, minimum and largest drop of
      :math:`\pi(y^+)`, margin growth, top-3 gainers at :data:`REPORT_STEPS`, benign /
      catastrophic gainers), their means and ``effect`` (module docstring).
    """
    probs = np.exp(logp)  # [4R, T+1, V]
    R = runs_per_pair
    pairs = {}
    for j, (yp, yn) in enumerate(PAIRS):
        runs = [
            _run_basics(probs[r], logp[r], data.run_prompts[r], yp, yn, data)
            for r in range(j * R, (j + 1) * R)
        ]
        pairs[f"{yp}>{yn}"] = _pair_basics(runs, R, drop_threshold)
    return {"lr": lr, "pairs": pairs}


def summarise_cell(
    logp: np.ndarray,
    at0: dict,
    lr: float,
    data: StatementFeatures,
    K_start: np.ndarray,
    K_init: np.ndarray,
    *,
    runs_per_pair: int,
    drop_threshold: float,
) -> dict[str, Any]:
    r"""Return :func:`summarise_runs` with the kernel numbers of each run and pair.

    Args:
      logp: as :func:`summarise_runs`.
      at0: :func:`first_step_measurements` of the runs.
      K_start, K_init: ``[4R, d, d]`` gradient-flow kernels at the runs' prompts after and
        before SFT.

    Returns:
      :func:`summarise_runs`'s record plus ``K_P_closed_form_vs_measured``; each run adds
      :math:`\lambda_{\mathrm{eff}}` of ``K_init``, ``K_start`` and :math:`K_P` on ``span(S)``,
      the kernel form and free-h vs the true first-step velocity, and the ranks of :math:`y^+`
      and of the best yes-like token by the alignment :math:`W_z^\top K (W_{y^+} - W_{y^-})`;
      each pair their summaries.
    """
    at0 = {k: np.asarray(v) for k, v in at0.items()}
    cell = summarise_runs(
        logp, lr, data, runs_per_pair=runs_per_pair, drop_threshold=drop_threshold
    )
    R = runs_per_pair
    lam = [_lambda_eff(K, data.S) for K in (K_init, K_start, at0["K_P"])]  # 3 x [4R]
    for j, (yp, yn) in enumerate(PAIRS):
        pair = cell["pairs"][f"{yp}>{yn}"]
        runs = pair["runs"]
        for r, run in zip(range(j * R, (j + 1) * R), runs, strict=True):
            run.update(_run_kernel(logp[r], at0, r, yp, yn, K_start, lam, lr, data))
        pair.update({
            **{
                f"lambda_eff_{k}": _stats([x["lambda_eff"][i] for x in runs])
                for i, k in enumerate(("K_init", "K", "KP"))
            },
            "kernel_sign_agreement": _stats([x["kernel_vs_truth"]["sign_agreement"] for x in runs]),
            "kernel_max_rel_err": max(x["kernel_vs_truth"]["rel_err"] for x in runs),
            "free_h_sign_agreement": _stats([x["free_h_vs_truth"]["sign_agreement"] for x in runs]),
            "free_h_correlation": _stats([x["free_h_vs_truth"]["correlation"] for x in runs]),
            "rank_pos_K_P": _stats([x["rank_pos"]["K_P"] for x in runs]),
            "rank_best_yes_like_K_P": _stats([x["rank_best_yes_like"]["K_P"] for x in runs]),
        })  # fmt: skip
    cell["K_P_closed_form_vs_measured"] = float(
        relative_error(at0["K_P"][0], at0["K_P_measured_first"])
    )
    return cell


def preference_cell(
    model: ScaledMLPFeatures,
    data: StatementFeatures,
    loss: Any,
    lr: float,
    K_start: np.ndarray,
    K_init: np.ndarray,
    *,
    num_steps: int,
    runs_per_pair: int,
    drop_threshold: float,
) -> dict[str, Any]:
    """Return :func:`summarise_cell` of every run of ``data`` at rate ``lr``: one single-prompt
    torch-RMSprop preference flow per run (vmapped, reference = ``model``), and
    :func:`first_step_measurements` (``W`` trains iff its rate is > 0)."""
    x, pos, neg = data.runs
    pairs = make_feature_pairs(model, x, pos, neg)
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], pairs)  # [R, 1, ...]
    logp = np.asarray(_flow(model, stacked, loss, lr, num_steps, _run_logprobs).observables)
    graphdef, state = nnx.split(model)
    trained = bool(model.unembedding_rate[...] > 0)
    at0 = first_step_measurements(
        graphdef, loss, trained, state, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(neg)
    )
    return summarise_cell(
        logp, at0, lr, data, K_start, K_init,
        runs_per_pair=runs_per_pair, drop_threshold=drop_threshold,
    )  # fmt: skip


def runs_cell(
    model: ScaledMLPFeatures | UnconstrainedFeatures,
    data: StatementFeatures,
    loss: Any,
    lr: float,
    *,
    num_steps: int,
    runs_per_pair: int,
    drop_threshold: float,
) -> dict[str, Any]:
    """Return :func:`summarise_runs` of every run of ``data`` at rate ``lr`` (as
    :func:`preference_cell`, without the kernel measurements; either model family)."""
    _, pos, neg = data.runs
    pairs = _pairs(model, data, data.run_prompts, pos, neg)
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], pairs)  # [R, 1, ...]
    free = isinstance(model, UnconstrainedFeatures)
    observe = _free_run_logprobs if free else _run_logprobs
    logp = np.asarray(_flow(model, stacked, loss, lr, num_steps, observe).observables)
    return summarise_runs(
        logp, lr, data, runs_per_pair=runs_per_pair, drop_threshold=drop_threshold
    )


def constructed_vocabulary(
    data: StatementFeatures, geometry: str, *, hidden_size: int, seed: int
) -> StatementFeatures:
    """Return ``data`` on the constructed vocabulary of ``no_over_never``.

    ``W`` [52, ``hidden_size``] is :func:`sims.data.vocab.semantic_unembeddings` (key ``seed``, the
    same for every ``geometry``: only ``No`` and ``Never`` differ); its label tokens (``No``,
    ``Yes``, ...) are renamed to the protocol's words (``no``, ``yes``, ...) and its informal
    ``no`` to ``no_informal``. Prompts, SFT labels (as words), the held-out prompt and the runs
    are those of ``data``.

    Example:
      >>> ids = {w: i for i, w in enumerate(NEG + POS)}
      >>> d = StatementFeatures(None, list(NEG + POS), ids, ["s"], None, np.array([1]), 0,
      ...                       (None, np.array([0]), np.array([1])), np.array([0]), None)
      >>> c = constructed_vocabulary(d, "catastrophic", hidden_size=8, seed=0)
      >>> c.W.shape, c.words[c.labels[0]], c.words[c.runs[1][0]], "no_informal" in c.words
      ((52, 8), 'never', 'no', True)
    """
    W, tokens = semantic_unembeddings(
        jax.random.key(seed), geometry=geometry, hidden_size=hidden_size
    )
    W = np.asarray(W, np.float64)
    rename = {w.capitalize(): w for w in NEG + POS} | {"no": "no_informal"}
    words = [rename.get(t, t) for t in tokens]
    ids = {w: words.index(w) for w in NEG + POS}
    word_of = {i: w for w, i in data.ids.items()}
    relabel = lambda a: np.array([ids[word_of[int(i)]] for i in a])  # noqa: E731
    x, pos, neg = data.runs
    S = np.stack([W[[ids[w] for w in NEG]].mean(0), W[[ids[w] for w in POS]].mean(0)])
    return data._replace(W=W, words=words, ids=ids, labels=relabel(data.labels),
                         runs=(x, relabel(pos), relabel(neg)), S=S)  # fmt: skip


def free_hidden_model(W: np.ndarray, num_prompts: int, *, seed: int) -> UnconstrainedFeatures:
    """Return the free-h model: ``W`` and one hidden embedding per prompt, ``N(0, 1/d)`` entries
    (key ``seed``), both trainable (Razin et al. 2024, §4.1), float64."""
    d = W.shape[1]
    H = jax.random.normal(jax.random.key(seed), (num_prompts, d), jnp.float64) / np.sqrt(d)
    return UnconstrainedFeatures.from_arrays(jnp.asarray(W, jnp.float64), H)


def cell_verdict(cell: dict) -> str:
    """Return ``"uninformative"`` if the cell's rate rule missed its margin target, else
    ``"reproduced"`` iff the EFFECT holds for no>never and for none of the controls.

    Example:
      >>> pairs = {"no>never": {"effect": True}, "never>no": {"effect": False}}
      >>> cell_verdict({"pairs": pairs}), cell_verdict({"pairs": pairs, "calibration": {"met": 0}})
      ('reproduced', 'uninformative')
    """
    if not cell.get("calibration", {"met": True})["met"]:
        return "uninformative"
    pairs = cell["pairs"]
    target = pairs["no>never"]["effect"]
    controls = [v["effect"] for k, v in pairs.items() if k != "no>never"]
    return "reproduced" if target and not any(controls) else "not reproduced"


def control_detects(control: dict, *, margin_target: float) -> tuple[bool, list[str]]:
    """Return whether the positive control detects the effect, and why not.

    It does iff, with free h at ``margin_target``, no>never shows the EFFECT in the
    ``catastrophic`` geometry and not in ``benign`` or ``none``, each rate rule meeting its
    target (cells keyed ``"geometry/free_h/margin<target>"``; a missing geometry fails).

    Example:
      >>> cell = lambda e: {"pairs": {"no>never": {"effect": e}}, "calibration": {"met": True}}
      >>> c = {"catastrophic/free_h/margin8": cell(True), "benign/free_h/margin8": cell(False),
      ...      "none/free_h/margin8": cell(False)}
      >>> control_detects(c, margin_target=8.0)
      (True, [])
    """
    reasons = []
    for geometry, expected in (("catastrophic", True), ("benign", False), ("none", False)):
        cell = control.get(f"{geometry}/free_h/margin{margin_target:g}")
        if cell is None:
            reasons.append(f"{geometry}/free_h at {margin_target:g} nats not run")
        elif not cell["calibration"]["met"]:
            reasons.append(f"{geometry}/free_h: no rate grows the margin {margin_target:g} nats")
        elif cell["pairs"]["no>never"]["effect"] != expected:
            reasons.append(
                f"{geometry}/free_h: no>never EFFECT {not expected}, expected {expected}"
            )
    return not reasons, reasons


def cell_line(cell: dict) -> str:
    """Return one printable line of a cell: lr and, per pair, start / drop / margin growth /
    yes-like runs and (cells with kernel numbers) lambda_eff and the rank of y+."""
    parts = [f"lr {cell['lr']:.3g}"]
    for k, v in cell["pairs"].items():
        text = (
            f"{k} start {v['pi_pos_start_mean']:.2f} drop {v['max_drop_mean']:.2f} "
            f"margin +{v['margin_growth_mean']:.1f} "
            f"yes-like {v['yes_like_gainer_runs']}/{len(v['runs'])}"
        )
        if "lambda_eff_K" in v:
            text += (
                f" lam K {v['lambda_eff_K']['mean']:.2f} K_P {v['lambda_eff_KP']['mean']:.2f} "
                f"rank y+ {v['rank_pos_K_P']['mean']:.0f}"
            )
        parts.append(text)
    return "; ".join(parts)


def summary_report(results: dict) -> str:
    """Return the printable summary of a learned-features record: the verdict and its reasons,
    then one :func:`cell_line` per main and control cell (none in a skipped record).

    Example:
      >>> summary_report({"verdict": "skipped", "reasons": "(MiniLM absent)"})
      'skipped (MiniLM absent)'
    """
    cells = {**results.get("cells", {}), **results.get("control", {}).get("cells", {})}
    lines = [f"{k}: {cell_line(v)}" for k, v in cells.items()]
    return "\n".join([f"{results['verdict']} {results.get('reasons', '')}", *lines])


def run_learned_features(
    *,
    vocab_size: int,
    width: int,
    lazy_scale: float,
    unembedding_rate: float,
    sft_steps: int,
    sft_target: float,
    margin_targets: Sequence[float],
    beta: float,
    tau: float,
    loss_types: Sequence[str],
    inits: Sequence[str],
    arms: Sequence[str],
    num_steps: int,
    runs_per_pair: int,
    drop_threshold: float,
    control_geometries: Sequence[str],
    control_features: Sequence[str],
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the protocol (float64; needs ``jax_enable_x64``) and return its JSON-ready record.

    Main grid, per init of :data:`INITS`: a :class:`~sims.models.mlp_features.ScaledMLPFeatures`
    (seed ``seed``; all inits share their weights), :func:`rate_rule_sft`, the kernels before and
    after SFT; then per arm of :data:`ARMS` (``W_trained``: rate ``unembedding_rate``), loss (DPO
    with ``beta``, IPO with ``tau``) and margin target: :func:`margin_rate`,
    :func:`preference_cell`, :func:`cell_verdict`. Positive control, per geometry of
    ``control_geometries`` (:func:`constructed_vocabulary`, ``d =`` :data:`CONTROL_HIDDEN_SIZE`)
    and feature kind of ``control_features`` (``free_h``: :func:`free_hidden_model`; ``mlp``: a
    mean-field ``ScaledMLPFeatures`` of width ``width``, ``W`` frozen): :func:`rate_rule_sft`,
    then per margin target :func:`margin_rate` and :func:`runs_cell` with DPO.

    Returns:
      ``vocab_kept``, ``prompts``, ``sft`` (per init), ``cells`` (``"arm/init/loss/margin<m>"``
      -> :func:`summarise_cell` plus ``calibration``), ``cell_verdicts``, ``control``
      (``sft`` and ``cells`` keyed ``"geometry/features/margin<m>"``, ``cell_verdicts``,
      ``detects``), ``verdict`` and its ``reasons``, ``reproduced_in``. The verdict is
      ``"reproduced"`` iff some main cell is; otherwise ``"not reproduced"`` if the control
      detects the effect at the largest margin target (:func:`control_detects`) and every main
      cell at that target met it, else ``"uninformative"``.
    """
    data = statement_features(vocab_size=vocab_size, runs_per_pair=runs_per_pair, seed=seed)
    losses = {"dpo": make_loss("dpo", beta=beta), "ipo": make_loss("ipo", tau=tau)}
    steps = {"num_steps": num_steps}
    rule = {"runs_per_pair": runs_per_pair, "drop_threshold": drop_threshold}
    cells, sft = {}, {}
    for init in inits:
        model0 = ScaledMLPFeatures(
            data.W, data.features.shape[1], width=width, parametrisation=init,
            lazy_scale=lazy_scale, rngs=nnx.Rngs(seed), dtype=jnp.float64,
        )  # fmt: skip
        model, sft[init] = rate_rule_sft(
            model0, data.features, data.labels, steps=sft_steps, target=sft_target
        )
        K_init, err_init = feature_kernels(model0, data.runs[0])
        K_start, err_start = feature_kernels(model, data.runs[0])
        sft[init].update(kernel_change(K_init, K_start, data.S))
        sft[init]["K_closed_form_vs_measured"] = max(err_init, err_start)
        log(f"[learned features] {init}: SFT lr {sft[init]['lr']:.3g}, {sft[init]}")
        for arm in arms:
            armed = model.with_unembedding_rate(unembedding_rate if arm == "W_trained" else 0.0)
            for lt, target in ((lt, m) for lt in loss_types for m in margin_targets):
                cal = margin_rate(armed, data, losses[lt], **steps, margin_target=target)
                key = f"{arm}/{init}/{lt}/margin{target:g}"
                cells[key] = preference_cell(
                    armed, data, losses[lt], cal["lr"], K_start, K_init, **steps, **rule
                )
                cells[key]["calibration"] = cal
                log(f"[learned features] {key}: {cell_line(cells[key])}")
    control = {"sft": {}, "cells": {}}
    for geometry in control_geometries:
        cdata = constructed_vocabulary(data, geometry, hidden_size=CONTROL_HIDDEN_SIZE, seed=seed)
        for kind in control_features:
            if kind == "free_h":
                model0 = free_hidden_model(cdata.W, len(cdata.texts), seed=seed)
            else:
                model0 = ScaledMLPFeatures(
                    cdata.W, cdata.features.shape[1], width=width, parametrisation="mean_field",
                    rngs=nnx.Rngs(seed), dtype=jnp.float64,
                )  # fmt: skip
            inputs = np.arange(len(cdata.texts)) if kind == "free_h" else cdata.features
            model, control["sft"][f"{geometry}/{kind}"] = rate_rule_sft(
                model0, inputs, cdata.labels, steps=sft_steps, target=sft_target
            )
            for target in margin_targets:
                cal = margin_rate(model, cdata, losses["dpo"], **steps, margin_target=target)
                key = f"{geometry}/{kind}/margin{target:g}"
                cell = runs_cell(model, cdata, losses["dpo"], cal["lr"], **steps, **rule)
                control["cells"][key] = {**cell, "calibration": cal}
                log(f"[learned features] control {key}: {cell_line(cell)}")
    verdicts = {k: cell_verdict(v) for k, v in cells.items()}
    control["cell_verdicts"] = {k: cell_verdict(v) for k, v in control["cells"].items()}
    top = max(margin_targets)
    control["detects"], reasons = control_detects(control["cells"], margin_target=top)
    reasons += [
        f"{k}: no rate grows the held-out margin {top:g} nats"
        for k, v in verdicts.items()
        if v == "uninformative" and k.endswith(f"/margin{top:g}")
    ]
    reproduced = [k for k, v in verdicts.items() if v == "reproduced"]
    verdict = "reproduced" if reproduced else "uninformative" if reasons else "not reproduced"
    return {
        "vocab_kept": len(data.words),
        "prompts": data.texts,
        "sft": sft,
        "cells": cells,
        "cell_verdicts": verdicts,
        "control": control,
        "verdict": verdict,
        "reasons": reasons,
        "reproduced_in": reproduced,
    }
