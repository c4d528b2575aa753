r"""The single-token Persona protocol of Razin et al. 2024 (§3, App. H.1) on a causal LM.

Pieces used by the ``persona_no_over_never`` experiment:

* :func:`encode_prompts` -- persona questions rendered with the checkpoint's chat template (or
  plain), right-padded to one length so every run compiles once;
* :func:`label_word_ids`, :func:`word_probabilities` -- label words as token sequences after the
  prompt, and their probabilities (a word of several tokens by teacher forcing);
* :func:`label_set_sft` -- SFT on label words in minibatches (the paper's 32), torch RMSprop,
  epoch after epoch until the mean probability of each prompt's trained label set reaches a
  target: the SFT budget rule;
* :func:`dpo_run` -- one single-prompt DPO or IPO run (torch RMSprop), recording the next-token
  distribution at every step, with the kernel-form prediction of its first step;
* :func:`row_verdict` -- the pre-registered verdict of one row (pair, loss, learning rate).

Conventions: a label word follows the assistant header directly (the chat template ends it with a
newline), so its tokens are ``encode(word)`` without a leading space; a word's probability is
the product over its tokens and a set's is the sum over its words.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.analysis.gainers import decrease_bounds
from sims.analysis.kernel import KernelFormVelocity, first_step_velocity, rmsprop_preconditioner
from sims.checkpoints.tokenization import encode_prompts
from sims.flows.core import Flow, preference_flow, take_minibatch
from sims.models.transformer import (
    SequenceSFTData,
    TokenBatch,
    make_prompt_answer_pairs,
    next_token_logprobs,
)
from theory.losses import BoundLoss


def label_word_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Return each word's token ids as it follows the assistant header (no leading space).

    Raises:
      ValueError: a word that encodes to no token.
    """
    out = []
    for w in words:
        ids = [int(i) for i in tokenizer.encode(w, add_special_tokens=False).ids]
        if not ids:
            raise ValueError(f"label word {w!r} encodes to no token")
        out.append(ids)
    return out


def with_answers(prompts: TokenBatch, answers: Sequence[Sequence[int]], *, pad_id: int):
    """Return the :class:`TokenBatch` of prompt ``i`` followed by ``answers[i]``, right-padded."""
    tokens, plen = np.asarray(prompts.tokens), np.asarray(prompts.prompt_len)
    N, T = tokens.shape
    K = max(len(a) for a in answers)
    out = np.full((N, T + K), pad_id, np.int32)
    for r, a in enumerate(answers):
        out[r, : plen[r]] = tokens[r, : plen[r]]
        out[r, plen[r] : plen[r] + len(a)] = a
    return TokenBatch(out, plen.copy(), plen + np.array([len(a) for a in answers], np.int32))


class WordTable(NamedTuple):
    """Label words prepared for :func:`word_probabilities` inside a compiled step.

    Attributes:
      prompts: the prompts :class:`TokenBatch`.
      multi: one :class:`TokenBatch` per word of several tokens (prompt + word).
    """

    prompts: TokenBatch
    multi: tuple


@dataclasses.dataclass(frozen=True)
class WordProbabilities:
    """``model, table -> [N, W]`` word probabilities (hashable: its structure is static).

    Attributes:
      first_token: per word, its token id if it is one token, else -1.
    """

    first_token: tuple[int, ...]

    def __call__(self, model: nnx.Module, table: WordTable) -> jax.Array:
        p = table.prompts
        first = jnp.exp(next_token_logprobs(model, p.tokens, p.prompt_len))  # [N, V]
        multi = iter(table.multi)
        cols = []
        for tok in self.first_token:
            if tok >= 0:
                cols.append(first[:, tok])
            else:
                cols.append(jnp.exp(SequenceSFTData(next(multi)).logprobs(model)))
        return jnp.stack(cols, axis=1)


def word_table(
    prompts: TokenBatch, words: Sequence[Sequence[int]], *, pad_id: int
) -> tuple[WordProbabilities, WordTable]:
    """Return the observable and its data for the probabilities of ``words`` after ``prompts``."""
    fn = WordProbabilities(tuple(w[0] if len(w) == 1 else -1 for w in words))
    multi = tuple(
        with_answers(prompts, [w] * len(prompts.prompt_len), pad_id=pad_id)
        for w in words
        if len(w) > 1
    )
    to_jnp = lambda b: TokenBatch(*(jnp.asarray(a) for a in b))  # noqa: E731
    return fn, WordTable(to_jnp(prompts), tuple(to_jnp(b) for b in multi))


def word_probabilities(model: nnx.Module, prompts: TokenBatch, words, *, pad_id: int):
    """Return ``[N, W]`` :math:`\\pi(w|x)` of every word after every prompt (one compile)."""
    fn, table = word_table(prompts, words, pad_id=pad_id)
    return np.asarray(_word_probs_jit(model, table, fn))


@functools.partial(jax.jit, static_argnames=("fn",))
def _word_probs_jit(model, table, fn):
    return fn(model, table)


@dataclasses.dataclass(frozen=True)
class MinibatchSFTLoss:
    """SFT loss of minibatch ``step mod ceil(N / batch_size)`` of the rows in their given order
    (hashable): one epoch visits every row once in batches of ``batch_size``; a short last batch
    weights its padding rows 0."""

    graphdef: Any
    batch_size: int
    num_rows: int

    def __call__(self, params, rest_and_data, hyper) -> jax.Array:
        rest, (data, _, _) = rest_and_data
        model = nnx.merge(self.graphdef, params, rest)
        batch, weight = take_minibatch(data, hyper["step"], self.batch_size, self.num_rows)
        return -jnp.sum(weight * batch.logprobs(model)) / jnp.sum(weight)


@dataclasses.dataclass(frozen=True)
class TrainedSetProbability:
    """Observable of the SFT flow: the mean over rows of the probability of each row's trained
    label set (``mask [N, W]`` marks the words of row ``i``'s set)."""

    graphdef: Any
    words: WordProbabilities

    def __call__(self, params, rest_and_data, hyper) -> jax.Array:
        rest, (_, table, mask) = rest_and_data
        probs = self.words(nnx.merge(self.graphdef, params, rest), table)
        return jnp.mean(jnp.sum(probs * mask, axis=1))


class SFTBudget(NamedTuple):
    """The SFT phase chosen by the budget rule.

    Attributes:
      model: the model after ``epochs`` epochs.
      epochs: epochs run: the first whose mean set probability reached the target, else the cap.
      reached: whether the target was reached.
      set_probability: ``[epochs + 1]`` mean trained-set probability after each epoch (0: before).
    """

    model: nnx.Module
    epochs: int
    reached: bool
    set_probability: np.ndarray


def label_set_sft(
    model: nnx.Module,
    prompts: TokenBatch,
    labels: Sequence[int],
    words: Sequence[Sequence[int]],
    word_set: Sequence[int],
    *,
    lr: float,
    batch_size: int,
    target: float,
    max_epochs: int,
    seed: int,
    pad_id: int,
) -> SFTBudget:
    """SFT on label words until the mean probability of each prompt's label set reaches ``target``.

    Row ``i`` is trained on word ``labels[i]`` (an index into ``words``); its *set* is every word
    ``j`` with ``word_set[j] == word_set[labels[i]]``. Minibatches of ``batch_size`` in a seeded
    order, torch RMSprop at ``lr``, one optimiser state across epochs; the run stops after the
    first epoch whose mean set probability is ``>= target`` (at most ``max_epochs``).

    Source: Razin et al. 2024, App. H.1 (cross-entropy on the label, RMSprop, batch 32, one
    epoch); the budget rule (smallest number of epochs reaching the target) is this project's.
    """
    labels = np.asarray(labels)
    N = len(labels)
    order = np.random.default_rng(seed).permutation(N)
    data = SequenceSFTData(with_answers(prompts, [words[i] for i in labels], pad_id=pad_id))
    data = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[order]), data)
    observe_words, table = word_table(prompts, words, pad_id=pad_id)
    word_set = np.asarray(word_set)
    mask = jnp.asarray((word_set[None, :] == word_set[labels][:, None]).astype(np.float32))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    steps = -(-N // batch_size)
    flow = Flow(
        MinibatchSFTLoss(graphdef, batch_size, N),
        TrainedSetProbability(graphdef, observe_words),
        params,
        (rest, (data, table, mask)),
        dt=lr,
        num_steps=steps * max_epochs,
        record_every=steps,
        optimizer="rmsprop_torch",
        finalize=lambda p: nnx.merge(graphdef, p, rest),
        what="label-set SFT",
        chunk_records=1,
        record_loss=False,
        until=lambda _, prob: (
            print(f"[label-set SFT] epoch done: set probability {prob:.3f}") or prob >= target
        ),
    )
    res = flow.run()
    history = np.asarray(res.observables, dtype=float)
    return SFTBudget(res.final, len(history) - 1, bool(history[-1] >= target), history)


class DPORun(NamedTuple):
    """One single-prompt preference run.

    Attributes:
      probs: ``[steps + 1, V]`` next-token distribution at the answer position (float32).
      logprob_chosen, logprob_rejected: ``[steps + 1]`` float64 log-probs of ``y+``, ``y-``.
      loss: ``[steps + 1]`` the loss at each step (float64, from the recorded log-probs).
      predicted_first_step: ``[V]`` ``lr *`` the kernel-form velocity at ``t = 0``.
      channels: the kernel-form velocity by channel
        (:class:`~sims.analysis.kernel.KernelFormVelocity`).
    """

    probs: np.ndarray
    logprob_chosen: np.ndarray
    logprob_rejected: np.ndarray
    loss: np.ndarray
    predicted_first_step: np.ndarray
    channels: KernelFormVelocity


def _answer_probs(model, pairs) -> jax.Array:
    return jnp.exp(pairs.next_token_logprobs(model))[0]  # [V]


@functools.partial(jax.jit, static_argnames=("loss", "unembedding", "tied"))
def _first_step_channels(
    model, tokens, plen, y_pos, y_neg, ref_c, ref_r, *, loss, unembedding, tied
) -> KernelFormVelocity:
    """The kernel-form first-step velocity of one pair, compiled once per model and shapes."""

    def hidden(m):
        return m.hidden_states(tokens)[plen - 1]

    def margin_loss(u):
        return loss(u, 0.0, ref_c, ref_r)

    def pair_loss(m):
        lp = jax.nn.log_softmax(m.logits(hidden(m)))
        return margin_loss(lp[y_pos] - lp[y_neg])

    P = rmsprop_preconditioner(pair_loss, model)
    return first_step_velocity(
        hidden,
        margin_loss,
        model,
        y_pos,
        y_neg,
        unembedding=unembedding,
        tied=tied,
        preconditioner=P,
    )


def dpo_run(
    model: nnx.Module,
    prompt: TokenBatch,
    y_pos: int,
    y_neg: int,
    loss: BoundLoss,
    *,
    lr: float,
    num_steps: int,
    unembedding: str,
    tied: bool,
) -> DPORun:
    """Run one single-prompt preference flow (torch RMSprop) and predict its first step.

    ``prompt`` is a one-row :class:`TokenBatch`; the reference model is ``model``. Before the
    run, :func:`sims.analysis.kernel.first_step_velocity` with RMSprop's first-step
    preconditioner gives the kernel form's prediction of every log-prob's first-step change.

    Source: Razin et al. 2024 §3 and App. H.1 (single prompt, 100 RMSprop steps).
    """
    pairs = make_prompt_answer_pairs(model, prompt, [y_pos], [y_neg])
    ref_c, ref_r = float(pairs.ref_logprob_chosen[0]), float(pairs.ref_logprob_rejected[0])
    channels = _first_step_channels(
        model,
        jnp.asarray(prompt.tokens[0]),
        jnp.int32(int(prompt.prompt_len[0])),
        jnp.int32(y_pos),
        jnp.int32(y_neg),
        pairs.ref_logprob_chosen[0],
        pairs.ref_logprob_rejected[0],
        loss=loss,
        unembedding=unembedding,
        tied=tied,
    )
    res = preference_flow(
        model,
        pairs,
        loss,
        dt=lr,
        num_steps=num_steps,
        optimizer="rmsprop_torch",
        observe=_answer_probs,
        record_loss=False,
    ).run()
    probs = np.asarray(res.observables)  # [steps + 1, V]
    lp_c = np.log(probs[:, y_pos].astype(np.float64))
    lp_r = np.log(probs[:, y_neg].astype(np.float64))
    host_loss = np.asarray(loss(lp_c - lp_r, 0.0, ref_c, ref_r), dtype=np.float64)
    return DPORun(probs, lp_c, lp_r, host_loss, lr * np.asarray(channels.total), channels)


def is_stable(loss: np.ndarray) -> bool:
    """The paper's stability filter: the training loss fell at every step (App. H.1)."""
    return bool(np.all(np.diff(np.asarray(loss)) < 0))


#: Pre-registered thresholds of a row's verdict (the issue's criterion, Razin et al. Table 1).
MIN_STABLE_RUNS = 5  # the paper reports configurations with at least five stable runs
MIN_MEAN_DROP = 0.2  # the paper's smallest single-token DPO drop is 0.21
MIN_OPPOSITE_FRACTION = 0.5  # an opposite-set top-3 gainer in at least half the stable runs
MIN_START_PROBABILITY = 0.5  # below this a run cannot show the paper's drop: not evidence


def row_verdict(
    start: np.ndarray, stable: np.ndarray, drops: np.ndarray, opposite: np.ndarray
) -> dict[str, Any]:
    """Return the pre-registered verdict of one row from per-run arrays ``[R]``.

    ``start``: :math:`\\pi(y^+)` at the start of DPO; ``stable``: the stability filter;
    ``drops``: largest decrease of :math:`\\pi(y^+)`; ``opposite``: an opposite-set token among
    the top-3 gainers at step 5, 25 or 100. Only *informative* runs count (stable and starting
    at :math:`\\pi(y^+) \\ge 0.5`); a row with fewer than 5 of them is ``"uninformative"``.
    Otherwise ``"catastrophic displacement reproduced"`` if the mean drop is ``>= 0.2`` and an
    opposite-set gainer appears in at least half of them, ``"benign displacement"`` with the drop
    but not the gainers, else ``"not reproduced"``.

    Example:
      >>> row_verdict(np.full(6, 0.9), np.ones(6, bool), np.full(6, 0.3), np.ones(6, bool))[
      ...     "verdict"]
      'catastrophic displacement reproduced'
    """
    start, stable = np.asarray(start, float), np.asarray(stable, bool)
    drops, opposite = np.asarray(drops, float), np.asarray(opposite, bool)
    informative = stable & (start >= MIN_START_PROBABILITY)
    n = int(informative.sum())
    out: dict[str, Any] = {
        "num_runs": int(start.size),
        "num_stable": int(stable.sum()),
        "num_informative": n,
        "num_below_start_threshold": int((stable & (start < MIN_START_PROBABILITY)).sum()),
        "mean_largest_decrease": float(drops[informative].mean()) if n else None,
        "opposite_gainer_fraction": float(opposite[informative].mean()) if n else None,
    }
    if n < MIN_STABLE_RUNS:
        out["verdict"] = "uninformative"
        out["reason"] = (
            f"{n} informative runs (stable and starting at pi(y+) >= "
            f"{MIN_START_PROBABILITY}); {MIN_STABLE_RUNS} needed"
        )
        return out
    dropped = out["mean_largest_decrease"] >= MIN_MEAN_DROP
    opposite_ok = out["opposite_gainer_fraction"] >= MIN_OPPOSITE_FRACTION
    out["verdict"] = (
        "catastrophic displacement reproduced"
        if dropped and opposite_ok
        else "benign displacement"
        if dropped
        else "not reproduced"
    )
    return out


def drop_summary(probs_pos: np.ndarray) -> dict[str, np.ndarray]:
    """Per run ``[R]``: largest decrease of :math:`\\pi(y^+)` ``[R, steps]`` and its peak/trough."""
    drop, peak, trough = decrease_bounds(probs_pos)
    return {"largest_decrease": drop, "peak": peak, "trough": trough}


def table13(W: np.ndarray, pairs: Sequence[tuple[int, int]]) -> list[dict[str, float]]:
    r"""Return Table 13 of Razin et al. 2024 for each pair: the norms of the projection of
    :math:`W_{y^+} - W_{y^-}` onto :math:`W_{y^+}` and onto its orthogonal complement.

    Example:
      >>> table13(np.array([[1.0, 0.0], [0.0, 1.0]]), [(0, 1)])[0]
      {'projection_on_w_pos': 1.0, 'orthogonal': 1.0}
    """
    W = np.asarray(W, dtype=np.float64)
    out = []
    for y_pos, y_neg in pairs:
        u, w = W[y_pos] - W[y_neg], W[y_pos]
        along = (u @ w) / (w @ w) * w
        out.append(
            {
                "projection_on_w_pos": float(np.linalg.norm(along)),
                "orthogonal": float(np.linalg.norm(u - along)),
            }
        )
    return out


GAINER_STEPS = (5, 25, 100)  # steps whose top-3 gainers the paper tabulates (Tables 4-12)


def persona_row(
    model: nnx.Module,
    prompts: TokenBatch,
    candidates: Sequence[int],
    y_pos: int,
    y_neg: int,
    loss: BoundLoss,
    *,
    lr: float,
    num_runs: int,
    num_steps: int,
    seed: int,
    groups: dict,
    opposite: str,
    token_text: Callable[[int], str],
    unembedding: str,
    tied: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one row of the Table 1 protocol: ``num_runs`` single-prompt runs, each on a prompt
    drawn (seeded, without replacement) from ``candidates``; return its per-run numbers, gainer
    tables, verdict (:func:`row_verdict`) and the t = 0 predictor's record.

    Per run: :math:`\\pi(y^\\pm)` at every step, stability, the largest decrease of
    :math:`\\pi(y^+)`, the margin growth over the run, the top-3 gainers at
    :data:`GAINER_STEPS`, whether a token of the ``opposite`` set is among them, the kernel
    form's first-step prediction -- *predicted*: some ``opposite``-set token's first-step change
    exceeds :math:`y^+`'s; *observed*: an ``opposite``-set token among the top-3 gainers at step
    5 -- its relative error against the true first step (``max |pred - true| / max |true|``
    over the vocabulary) and the per-token channels of :math:`y^+`, :math:`y^-` and the leading
    opposite-set token.
    """
    from sims.analysis.gainers import runs_with_set_gainer, top_gainers

    picks = np.random.default_rng(seed).choice(len(candidates), num_runs, replace=False)
    opp_ids = np.array(sorted(t for t, g in groups.items() if g.label_set == opposite))
    probs, lp_c, lp_r, losses, predicted, kernel_err, channels = [], [], [], [], [], [], []
    for r, k in enumerate(picks):
        i = int(candidates[k])
        prompt = TokenBatch(*(np.asarray(a)[i : i + 1] for a in prompts))
        run = dpo_run(
            model,
            prompt,
            y_pos,
            y_neg,
            loss,
            lr=lr,
            num_steps=num_steps,
            unembedding=unembedding,
            tied=tied,
        )
        probs.append(run.probs[[0, *[s for s in GAINER_STEPS if s <= num_steps]]])
        lp_c.append(run.logprob_chosen)
        lp_r.append(run.logprob_rejected)
        losses.append(run.loss)
        pred = run.predicted_first_step
        best = int(opp_ids[np.argmax(pred[opp_ids])])
        predicted.append(bool(pred[best] > pred[y_pos]))
        true = np.log(run.probs[1].astype(np.float64)) - np.log(run.probs[0].astype(np.float64))
        kernel_err.append(float(np.max(np.abs(pred - true)) / np.max(np.abs(true))))
        channels.append(
            {
                name: {
                    "token": token_text(z),
                    **{
                        c: float(lr * getattr(run.channels, c)[z])
                        for c in ("total", "hidden", "tied", "unembedding")
                    },
                }
                for name, z in (("y_pos", y_pos), ("y_neg", y_neg), ("opposite_leader", best))
            }
        )
        log(
            f"    run {r + 1}/{num_runs}: prompt {i}, pi(y+) {np.exp(lp_c[-1][0]):.3f} -> "
            f"{np.exp(lp_c[-1][-1]):.3f}, pi(y-) {np.exp(lp_r[-1][0]):.4f} -> "
            f"{np.exp(lp_r[-1][-1]):.2e}"
        )
    lp_c, lp_r, losses = np.array(lp_c), np.array(lp_r), np.array(losses)
    stable = np.array([is_stable(x) for x in losses])
    start = np.exp(lp_c[:, 0])
    drop = drop_summary(np.exp(lp_c))
    tables, opposite_hit, at_step5 = {}, np.zeros(num_runs, bool), np.zeros(num_runs, bool)
    for j, step in enumerate(s for s in GAINER_STEPS if s <= num_steps):
        increase = np.array([p[j + 1] - p[0] for p in probs])
        rows, top = top_gainers(increase, token_text, groups, runs=stable)
        hit = runs_with_set_gainer(top, groups, opposite)
        tables[str(step)] = [g._asdict() for g in rows]
        opposite_hit |= hit
        at_step5 = hit if step == GAINER_STEPS[0] else at_step5
    predicted = np.array(predicted)
    return {
        "prompts": [int(candidates[k]) for k in picks],
        "pi_pos": np.exp(lp_c),
        "pi_neg": np.exp(lp_r),
        "loss": losses,
        "stable": stable,
        "pi_pos_start": start,
        **drop,
        "margin_growth": (lp_c[:, -1] - lp_r[:, -1]) - (lp_c[:, 0] - lp_r[:, 0]),
        "top_gainers": tables,
        "opposite_top3_any_step": opposite_hit,
        "predictor": {
            "predicted_opposite_outpaces_y_pos": predicted,
            "observed_opposite_top3_at_step_5": at_step5,
            "channels": channels,
        },
        "kernel_form_relative_error": np.array(kernel_err),
        "verdict": row_verdict(start, stable, drop["largest_decrease"], opposite_hit),
    }


def confusion(predicted: np.ndarray, observed: np.ndarray) -> dict[str, int]:
    """Return the confusion counts of boolean predictions against observations.

    Example:
      >>> confusion(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
      {'true_positive': 1, 'false_positive': 1, 'false_negative': 1, 'true_negative': 1}
    """
    p, o = np.asarray(predicted, bool), np.asarray(observed, bool)
    return {
        "true_positive": int(np.sum(p & o)),
        "false_positive": int(np.sum(p & ~o)),
        "false_negative": int(np.sum(~p & o)),
        "true_negative": int(np.sum(~p & ~o)),
    }


#: The paper's learning rates and KL coefficients (App. H.1): DPO lr 1e-7, beta 0.1; IPO lr
#: 1e-8 (higher was unstable), tau 0.01.
PAPER_SETTINGS = {"dpo": (1e-7, {"beta": 0.1}), "ipo": (1e-8, {"tau": 0.01})}
#: The label sets (App. H.1) by side: a No-set y+ is run on trait-according prompts.
SIDES = {
    "no": ("No", "Never", "Maybe", "Perhaps"),
    "yes": ("Yes", "Yeah", "Sure", "Certainly", "Absolutely"),
}
SFT_TARGET = 0.8  # mean trained-set probability the SFT budget must reach (the paper's regime)
SFT_BATCH = 32  # the paper's SFT batch


def _side(word: str) -> str:
    for side, words in SIDES.items():
        if word in words:
            return side
    raise ValueError(f"y+ and y- must be label words of {SIDES}, got {word!r}")


def run_persona_protocol(
    ckpt: Any,
    *,
    rows: Sequence[str],
    losses: Sequence[str],
    lr_factors: Sequence[float],
    num_runs: int,
    dpo_steps: int,
    num_statements: int,
    sft_lr: float,
    sft_max_epochs: int,
    seed: int,
    sft: str = "label_set",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the Table 1 protocol on an opened checkpoint (:mod:`sims.checkpoints.opened`).

    ``sft="label_set"`` (the paper's protocol): label-set SFT under the budget rule, then for
    every row ``"y+>y-"``, loss and learning-rate factor, :func:`persona_row`; rows whose runs
    start at mean :math:`\\pi(y^+) < 0.5` are run again after the stated deviation (SFT on
    :math:`y^+` itself). ``sft="y_pos"``: only the deviation's path (SFT on :math:`y^+`, then
    the rows), for a short run; Table 13 is then of the checkpoint's own ``W``. Returns the
    JSON-ready record:
    SFT budgets, per-row results with verdicts, the predictor's confusion table, the kernel
    form's first-step errors, Table 13 and the prompt format.

    Raises:
      ValueError: a row whose words are not single tokens for the tokenizer, or not label words;
        ``sft`` not one of the two modes.
    """
    from sims.analysis.gainers import label_token_groups
    from sims.data.persona import ACCORDING, NOT_ACCORDING, PERSONA_TEMPLATE
    from theory.losses import make_loss

    tok, model = ckpt.tokenizer, ckpt.model
    n = num_statements or max(len(ACCORDING), len(NOT_ACCORDING))
    statements = [*ACCORDING[:n], *NOT_ACCORDING[:n]]
    according = np.array([True] * len(ACCORDING[:n]) + [False] * len(NOT_ACCORDING[:n]))
    pad = ckpt.special_id("pad_token", ckpt.special_id("eos_token", 0))
    questions = [PERSONA_TEMPLATE.format(statement=s) for s in statements]
    prompts = encode_prompts(
        tok, questions, template=ckpt.template, special=ckpt.special, pad_id=pad
    )
    all_words = [*SIDES["no"], *SIDES["yes"]]
    words = label_word_ids(tok, all_words)
    word_side = np.array([0] * len(SIDES["no"]) + [1] * len(SIDES["yes"]))
    rng = np.random.default_rng(seed)
    labels = np.where(
        according, rng.integers(0, 4, len(statements)), 4 + rng.integers(0, 5, len(statements))
    )
    if sft not in ("label_set", "y_pos"):
        raise ValueError(f"sft must be 'label_set' or 'y_pos', got {sft!r}")
    log(f"[persona] {len(statements)} prompts ({ckpt.prompt_format}), {sft} SFT at lr {sft_lr}")
    sft_run = (
        None
        if sft == "y_pos"
        else label_set_sft(
            model,
            prompts,
            labels,
            words,
            word_side,
            lr=sft_lr,
            batch_size=SFT_BATCH,
            target=SFT_TARGET,
            max_epochs=sft_max_epochs,
            seed=seed,
            pad_id=pad,
        )
    )
    groups = label_token_groups(lambda s: tok.encode(s, add_special_tokens=False).ids, SIDES)
    text = lambda z: tok.id_to_token(int(z)) or str(z)  # noqa: E731
    tied = model.lm_head is None
    head = "embed_tokens.weight" if tied else "lm_head.weight"
    out: dict[str, Any] = {"rows": {}, "deviation_sft": {}}

    def run_rows(start_model, phase: str, only: Sequence[str]) -> None:
        for row in only:
            pos_word, neg_word = row.split(">")
            y_pos, y_neg = ckpt.token_id(pos_word), ckpt.token_id(neg_word)
            side = _side(pos_word)
            candidates = np.flatnonzero(according if side == "no" else ~according)
            for loss_type in losses:
                base_lr, hyper = PAPER_SETTINGS[loss_type]
                for factor in lr_factors:
                    key = f"{phase}|{row}|{loss_type}|lr x{factor:g}"
                    log(f"[persona] {key}")
                    out["rows"][key] = persona_row(
                        start_model,
                        prompts,
                        candidates,
                        y_pos,
                        y_neg,
                        make_loss(loss_type, **hyper),
                        lr=base_lr * factor,
                        num_runs=num_runs,
                        num_steps=dpo_steps,
                        seed=seed + zlib.crc32(row.encode()) % 1000,
                        groups=groups.groups,
                        opposite="yes" if side == "no" else "no",
                        token_text=text,
                        unembedding=head,
                        tied=tied,
                        log=log,
                    )

    if sft_run is not None:
        run_rows(sft_run.model, "label-set SFT", rows)
    W = np.asarray((sft_run or ckpt).model.unembedding_matrix(), dtype=np.float64)
    pair_ids = [tuple(ckpt.token_id(w) for w in r.split(">")) for r in rows]
    for row in rows:  # the stated deviation: SFT on y+ itself where label-set SFT left it < 0.5
        starts = [np.mean(v["pi_pos_start"]) for k, v in out["rows"].items() if f"|{row}|" in k]
        if sft_run is not None and np.mean(starts) >= MIN_START_PROBABILITY:
            continue
        pos_word = row.split(">")[0]
        side_rows = np.flatnonzero(according if _side(pos_word) == "no" else ~according)
        sub = TokenBatch(*(np.asarray(a)[side_rows] for a in prompts))
        j = all_words.index(pos_word)
        only_pos = np.arange(len(all_words)) + 1  # every word its own set: train pi(y+) alone
        log(f"[persona] deviation: SFT on {pos_word!r} for {row}")
        dev = label_set_sft(
            model,
            sub,
            np.full(len(side_rows), j),
            words,
            only_pos,
            lr=sft_lr,
            batch_size=SFT_BATCH,
            target=SFT_TARGET,
            max_epochs=sft_max_epochs,
            seed=seed,
            pad_id=pad,
        )
        out["deviation_sft"][row] = {
            "epochs": dev.epochs,
            "reached": dev.reached,
            "pi_y_pos": dev.set_probability,
        }
        run_rows(dev.model, f"SFT on {pos_word}", [row])
    runs = list(out["rows"].values())
    predicted = np.concatenate([r["predictor"]["predicted_opposite_outpaces_y_pos"] for r in runs])
    observed = np.concatenate([r["predictor"]["observed_opposite_top3_at_step_5"] for r in runs])
    errors = np.concatenate([r["kernel_form_relative_error"] for r in runs])
    out.update(
        sft={
            "mode": sft,
            "epochs": sft_run and sft_run.epochs,
            "reached": sft_run and sft_run.reached,
            "target": SFT_TARGET,
            "mean_trained_set_probability": sft_run and sft_run.set_probability,
            "lr": sft_lr,
        },
        predictor_confusion=confusion(predicted, observed),
        predictor_agreement=float(np.mean(predicted == observed)),
        kernel_form_first_step_error={
            "median": float(np.median(errors)),
            "max": float(np.max(errors)),
        },
        table13={r: t for r, t in zip(rows, table13(W, pair_ids), strict=True)},
        label_token_clashes=groups.clashes,
        prompt_format=ckpt.prompt_format,
        example_prompt=tok.decode(
            prompts.tokens[0][: prompts.prompt_len[0]].tolist(), skip_special_tokens=False
        ),
        weights=ckpt.weights,
    )
    return out
