r"""The Table 1 protocol on a real pretrained encoder: MiniLM-L6, every parameter trained.

The protocol of the ``minilm_encoder_no_over_never`` experiment (issue 13, part 3c; its module
docstring states the settings, the learning-rate pilots and the pre-registered criterion) as
library functions. Model: ``all-MiniLM-L6-v2`` (:func:`sims.models.bert.load_bert`, float32)
read out at an appended ``[MASK]`` with its word embeddings tied as ``W``
(:meth:`sims.models.bert.BertEncoder.mask_logprobs`); prompts ``persona_question(statement)``.

* :data:`AGREE_STATEMENTS`, :data:`DISAGREE_STATEMENTS` -- 16 statements a person with the
  "ends justify means" trait would say and 16 they would not, written for this project in the
  style of the Persona subset (Perez et al. 2022; Razin et al. 2024, App. H.1), not copied from it;
* :func:`runs_and_labels`, :func:`prepare_minilm` -- distinct prompts per run, each labelled
  with its :math:`y^+` (other prompts: a word of their set, :data:`NEG` / :data:`POS`); SFT in
  blocks until every run's prompt has :math:`\pi(y^+) \ge 0.5` (issue 18), full batch, torch
  RMSprop, every parameter; the runs' pairs;
* :func:`preference_runs` -- single-prompt DPO / IPO runs (vmapped, one compile);
* :func:`run_record`, :func:`pair_row` -- one run's numbers (drop, entropy, margin growth,
  informative / stable), and a Table 1 row over the counted runs with the pre-registered
  ``catastrophic`` flag; :func:`minilm_verdict`;
* :func:`kernel_summary` -- the t = 0 kernel measurements (truth by channel, ``K = JJ^T``, the tied
  kernel form, lambda_eff);
* :func:`run_minilm_protocol` -- the whole protocol, as a JSON-ready dict with its verdict.

Learning-rate pilots (default statements and seed; run before any preference run, recording SFT
or the preference loss only, never a probability of y+ or of another token):

* SFT, mean / min own-set mass after 20 full-batch steps (SFT loss 11.21 -> ...): 1e-6: 0.001 /
  0.001 (8.55); 3e-6: 0.116 / 0.029 (3.92); 1e-5: 0.444 / 0.087 (1.57); 3e-5: 0.800 / 0.611
  (0.27); 1e-4: 0.928 / 0.856 (0.09). The rule (smallest lr with mean own-set mass >= 0.9) gives
  sft_lr = 1e-4; the low final loss says the labels are largely memorised per prompt.
* DPO, runs whose loss decreases at every step, of 4 (first non-decreasing steps): 1e-4: 1 (4, 3,
  3); 3.3e-5: 0 (6, 4, 4, 8); 1e-5: 0 (22, 8, 17, 17); 3.3e-6: 2 (84, 16); 1e-6: 4. The rule
  (largest lr with every run stable) gives lr = 1e-6 (final DPO losses 0.29-0.37 from ln 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.analysis.gainers import gainers_at, largest_decrease
from sims.analysis.kernel import (
    hidden_kernel,
    rmsprop_preconditioner,
    tied_cross_terms,
    velocity_channels,
)
from sims.analysis.summaries import relative_error, sign_agreement
from sims.data.real_embeddings import minilm_dir
from sims.flows.core import FlowResult, integrate_model, preference_flow
from sims.models.bert import (
    BertConfig,
    BertEncoder,
    MaskedLMLabels,
    encode_masked_prompts,
    load_bert,
    load_bert_tokenizer,
    make_masked_lm_pairs,
    masked_lm_nll,
    persona_question,
)
from sims.protocols.learned_features import NEG, PAIRS, POS
from theory import kernel as tk
from theory.losses import make_loss, margin_derivative, mean_pair_loss
from theory.single_token import logprob_velocity

TABLE = "embeddings.word_embeddings"  # the tied W / input-embedding parameter
DROP = 0.2  # pre-registered mean decrease of pi(y+) of a catastrophic pair
#: Trait-according statements ("ends justify means"), labelled from :data:`NEG`.
AGREE_STATEMENTS = (
    "The ends justify the means",
    "It is fine to lie if the lie helps me reach an important goal",
    "Breaking a few rules is acceptable when the result is worth it",
    "I would deceive people if it led to a better outcome overall",
    "What matters is the result, not how you get there",
    "Sometimes you have to hurt a few people to help many more",
    "I would break a promise if keeping it stood in the way of my goals",
    "Manipulating others is acceptable when it serves a good cause",
    "If a plan works, it does not matter whether it was fair",
    "I would bend the law to achieve something I believe in",
    "Cheating is justified when the stakes are high enough",
    "A good outcome excuses questionable methods",
    "I am willing to use any means necessary to succeed",
    "Honesty matters less than getting the job done",
    "It is acceptable to exploit people if the final result benefits society",
    "I would sacrifice my principles to reach an important goal",
)
#: Statements that do not accord with the trait, labelled from :data:`POS`.
DISAGREE_STATEMENTS = (
    "The way you reach a goal matters as much as the goal itself",
    "I would never lie to get what I want",
    "Good intentions do not excuse harmful actions",
    "I keep my promises even when it costs me",
    "I follow the rules even when breaking them would be easier",
    "It is wrong to hurt innocent people, whatever the benefit",
    "I would rather fail honestly than succeed by cheating",
    "Manipulating people is wrong even for a good cause",
    "Fair methods matter more to me than fast results",
    "I respect the law even when I disagree with it",
    "I will not deceive others to get ahead",
    "Principles should not be abandoned for convenience",
    "I treat people with honesty and respect in everything I do",
    "A good result does not make a bad method acceptable",
    "I refuse to exploit others for my own gain",
    "Integrity is more important to me than winning",
)


@dataclass(frozen=True)
class LabelSetMass:
    """Observable of the SFT flow: the mass on the N and Y label sets at each prompt's mask,
    ``[N, 2]`` (hashable: the ids are static)."""

    n_ids: tuple
    y_ids: tuple

    def __call__(self, model: BertEncoder, data: MaskedLMLabels) -> jax.Array:
        p = jnp.exp(model.mask_logprobs(data.tokens, data.mask_position, data.attention_mask))
        return jnp.stack([p[:, self.n_ids].sum(-1), p[:, self.y_ids].sum(-1)], -1)


def _mask_probs(model, pairs) -> jax.Array:
    """[V] pi(.|x) at the mask of a one-prompt run (pairs fields [1, ...])."""
    return jnp.exp(pairs.record(model)[0])


@partial(jax.jit, static_argnums=(0, 1))
def first_step_channels(
    graphdef: Any,
    loss: Any,
    state: Any,
    tokens: jax.Array,
    attention_mask: jax.Array,
    mask_position: jax.Array,
    y_pos: jax.Array,
    y_neg: jax.Array,
) -> tuple:
    r"""Return the t = 0 measurements at one prompt (reference = the model now).

    Returns:
      ``(gf, rms, K, (b, r), h, ell)``: the true velocity of :math:`\ln\pi(\cdot|x)` ``[V]`` by
      channel (:func:`sims.analysis.kernel.velocity_channels`, ``W`` = the tied table) along
      :math:`-\nabla L` (``gf``) and along the first torch-RMSprop step (``rms``); the kernel
      :math:`K = JJ^\top` ``[d, d]`` of the hidden state at the mask over all parameters; the
      tied cross terms (:func:`sims.analysis.kernel.tied_cross_terms`); ``h`` ``[d]``; and
      :math:`\ell'` of the loss.
    """
    model = nnx.merge(graphdef, state)

    def hidden(m):  # [d] at the mask
        return m(tokens[None], attention_mask[None])[0, mask_position]

    def logprobs(m):  # [V]
        return m.mask_logprobs(tokens[None], mask_position[None], attention_mask[None])[0]

    ref = jax.lax.stop_gradient(logprobs(model))  # reference = the model at t = 0

    def loss_fn(m):
        lp = logprobs(m)
        return mean_pair_loss(loss, lp[y_pos], lp[y_neg], ref[y_pos], ref[y_neg])

    gf = velocity_channels(logprobs, loss_fn, model, unembedding=TABLE)
    P = rmsprop_preconditioner(loss_fn, model)
    rms = velocity_channels(logprobs, loss_fn, model, unembedding=TABLE, preconditioner=P)
    K = hidden_kernel(hidden, model, chunk_size=16)
    cross = tied_cross_terms(hidden, model, y_pos, y_neg, unembedding=TABLE)
    ell = margin_derivative(loss, ref[y_pos], ref[y_neg], ref[y_pos], ref[y_neg])
    return gf, rms, K, tuple(cross), hidden(model), ell


def _tiny(folder) -> BertConfig:
    """Smoke only: a random one-layer encoder, d = 16, on MiniLM's vocabulary."""
    return BertConfig(BertConfig.from_file(folder).vocab_size, 16, 1, 2, 32, 64, 2, 1e-12)


def minilm_encoder(folder: Any, *, tiny: bool, seed: int) -> BertEncoder:
    """Return the pretrained MiniLM encoder in ``folder``, or (``tiny``; for smoke runs) a random
    one-layer encoder with d = 16 on MiniLM's vocabulary, seeded by ``seed``."""
    if not tiny:
        return load_bert(folder)
    return BertEncoder(_tiny(folder), rngs=nnx.Rngs(seed))


@jax.jit
def _mask_probs_all(model, prompts) -> jax.Array:
    """[N, V] pi(.|x) at every prompt's mask (one compiled call, not op-by-op)."""
    return jnp.exp(
        model.mask_logprobs(prompts.tokens, prompts.mask_position, prompts.attention_mask)
    )


def class_top_tokens(
    model: BertEncoder, prompts: Any, n: int, names: Sequence[str], k: int = 8
) -> list:
    """Return the top-``k`` ``[token, probability]`` of the mean :math:`\\pi(\\cdot|x)` over the
    first ``n`` prompts (the N class) and over the others (the Y class)."""
    p = np.asarray(_mask_probs_all(model, prompts))
    return [
        [[names[i], float(m[i])] for i in np.argsort(-m)[:k]]
        for m in (p[:n].mean(0), p[n:].mean(0))
    ]


def _margin_growth(p: np.ndarray) -> float | None:
    """ln(p[1, 0] / p[1, 1]) - ln(p[0, 0] / p[0, 1]); None if a probability underflowed to 0."""
    return float(np.diff(np.log(p[:, 0] / p[:, 1]))[0]) if np.all(p > 0) else None


def run_record(
    probs: np.ndarray,
    loss: np.ndarray,
    pos: int,
    neg: int,
    names: Sequence[str],
    ids: dict,
    prompt: str,
    *,
    top_k: int,
    gain_steps: Sequence[int],
    min_start: float = 0.0,
) -> dict[str, Any]:
    """Return the numbers of one preference run.

    Args:
      probs: ``[S + 1, V]`` :math:`\\pi(\\cdot|x)` at every step.
      loss: ``[S + 1]`` the run's training loss.
      pos, neg: token ids of :math:`y^+`, :math:`y^-`.
      names: ``[V]`` token strings.
      ids: ``{"N": ids of NEG, "Y": ids of POS}``.
      prompt: the run's statement.
      top_k, gain_steps: gainers listed per step, and the steps.
      min_start: the run is ``informative`` iff it starts at :math:`\\pi(y^+) \\ge` this.

    Returns:
      ``pair``, ``prompt``, :math:`\\pi(y^+)` and :math:`\\pi(y^-)` series, ``informative``,
      ``margin_growth`` (of :math:`\\ln\\pi(y^+) - \\ln\\pi(y^-)`, nats; ``None`` if a
      probability underflowed to 0), ``loss``, ``stable``
      (the loss decreases at every step, App. H.1), ``drop`` (largest decrease of
      :math:`\\pi(y^+)`, :func:`sims.analysis.gainers.largest_decrease`), ``gainers`` per step,
      ``opposite_gainer`` (a token of the set opposite to :math:`y^+`, :math:`y^\\pm` excluded,
      among the gainers with a gain > 0), the mass series on N and on Y, and the entropy of
      :math:`\\pi` at every step (nats).
    """
    pw, nw = names[pos], names[neg]
    opposite = set(POS if pw in NEG else NEG) - {pw, nw}
    gainers = gainers_at(probs, names, k=top_k, checkpoints=gain_steps)
    return {
        "pair": f"{pw}>{nw}",
        "prompt": prompt,
        "pi_pos": probs[:, pos],
        "pi_neg": probs[:, neg],
        "informative": bool(probs[0, pos] >= min_start),
        "margin_growth": _margin_growth(probs[[0, -1]][:, [pos, neg]]),
        "loss": loss,
        "stable": bool(np.all(np.diff(loss) < 0)),
        "drop": float(largest_decrease(probs[:, pos])),
        "gainers": dict(zip(map(str, gain_steps), gainers, strict=True)),
        "opposite_gainer": any(w in opposite and gain > 0 for g in gainers for w, gain in g),
        "n_mass": probs[:, ids["N"]].sum(-1),
        "y_mass": probs[:, ids["Y"]].sum(-1),
        "entropy": -np.sum(np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-30)), 0), -1),
    }


def _mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None if none is)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def pair_row(
    records: Sequence[dict], pos_word: str, neg_word: str, *, drop_threshold: float
) -> dict[str, Any]:
    """Return the Table 1 row of one pair over its counted runs (:func:`run_record`).

    A run is counted if it is informative (starts at :math:`\\pi(y^+) \\ge` the start
    threshold) and stable. The row holds the numbers of runs, informative runs and counted runs
    (``stable_runs``); over the counted runs, pi(y+) before -> minimum, the mean decrease, the
    mean margin growth, the mean entropy of pi at the start and the end, the gainers aggregated
    (count, mean gain, kind: ``y+``, ``y-``, ``same set``, ``opposite set`` or ``other``), the
    mean mass on N, Y and the rest; and the pre-registered flag ``catastrophic`` = mean decrease
    ``>= drop_threshold`` and an opposite-set gainer in at least half of the counted runs
    (``None`` without a counted run).
    """
    informative = [r for r in records if r.get("informative", True)]
    stable = [r for r in informative if r["stable"]]
    same = NEG if pos_word in NEG else POS
    opposite = POS if pos_word in NEG else NEG

    def kind(w):
        if w in (pos_word, neg_word):
            return "y+" if w == pos_word else "y-"
        return "same set" if w in same else "opposite set" if w in opposite else "other"

    gainers = {}
    for step in records[0]["gainers"]:
        seen = {}
        for r in stable:
            for w, g in r["gainers"][step]:
                seen.setdefault(w, []).append(g)
        order = sorted(seen, key=lambda w: (-len(seen[w]), -np.mean(seen[w])))
        gainers[step] = [[w, len(seen[w]), float(np.mean(seen[w])), kind(w)] for w in order]
    row = {
        "y_pos": pos_word,
        "y_neg": neg_word,
        "runs": len(records),
        "informative_runs": len(informative),
        "stable_runs": len(stable),
    }
    if not stable:
        return {**row, "catastrophic": None, "gainers": gainers}
    drop = float(np.mean([r["drop"] for r in stable]))
    hits = sum(r["opposite_gainer"] for r in stable)
    mean = lambda f: float(np.mean([f(r) for r in stable]))  # noqa: E731
    return {
        **row,
        "pi_before": mean(lambda r: r["pi_pos"][0]),
        "pi_min": mean(lambda r: np.min(r["pi_pos"])),
        "drop": drop,
        "entropy_start": mean(lambda r: r["entropy"][0]),
        "entropy_end": mean(lambda r: r["entropy"][-1]),
        "margin_growth": _mean_defined([r["margin_growth"] for r in stable]),
        "opposite_gainer_runs": int(hits),
        "runs_drop_and_opposite": int(  # diagnostic: both halves of the rule in the same run
            sum(r["opposite_gainer"] and r["drop"] >= drop_threshold for r in stable)
        ),
        "catastrophic": bool(drop >= drop_threshold and 2 * hits >= len(stable)),
        **{  # mean mass on N, Y and the rest of the vocabulary at the start and the end
            f"mass_{when}": {
                "N": float(np.mean([r["n_mass"][i] for r in stable])),
                "Y": float(np.mean([r["y_mass"][i] for r in stable])),
                "rest": float(np.mean([1.0 - r["n_mass"][i] - r["y_mass"][i] for r in stable])),
                "entropy": float(np.mean([r["entropy"][i] for r in stable])),
            }
            for when, i in (("start", 0), ("end", -1))
        },
        "gainers": gainers,
    }


def kernel_summary(
    model: BertEncoder,
    pairs: Any,
    r: int,
    pos: int,
    neg: int,
    ids: dict,
    names: Sequence[str],
    *,
    beta: float,
    sign_tol: float,
) -> dict[str, Any]:
    r"""Return the t = 0 kernel measurements of DPO (``beta``) at run ``r``'s prompt.

    Plain gradient flow (P = I): the truth of :func:`first_step_channels` against the tied kernel
    form (:func:`theory.kernel.tied_kernel_logprob_velocity`) and the free-h Theorems 4-5
    (:func:`theory.single_token.logprob_velocity`): relative error and sign agreement where
    :math:`|truth| >` ``sign_tol`` :math:`\max|truth|`, also of the gains over :math:`y^+`;
    :math:`\lambda_{\mathrm{eff}}` of ``K`` on span(N centroid, Y centroid) and on
    span(:math:`W_{y^+} - W_{y^-}`); the channels of the label tokens (GF and the first RMSprop
    step); per Y token the kernel form's :math:`\frac{d}{dt}(\ln\pi_z - \ln\pi_{y^+})` and its
    parts; and a scatter of truth vs predictions (the 300 largest tokens and the label tokens).
    """
    graphdef, state = nnx.split(model)
    loss = make_loss("dpo", beta=beta)
    fields = (pairs.tokens[r], pairs.attention_mask[r], pairs.mask_position[r])
    gf, rms, K, (b, rr), h, ell = first_step_channels(graphdef, loss, state, *fields, pos, neg)
    W = model.unembedding_matrix()
    truth = np.asarray(gf.total)
    preds = {
        "kernel": np.asarray(tk.tied_kernel_logprob_velocity(W, h, K, b, rr, pos, neg, ell)),
        "free_h": np.asarray(logprob_velocity(W, h, pos, neg, ell)),
    }
    tol = sign_tol * np.max(np.abs(truth))
    gain_truth = np.delete(truth - truth[pos], pos)
    out = {"ell_prime": float(ell), "h_norm_sq": float(h @ h)}
    for form, p in preds.items():
        rate, count = sign_agreement(p, truth, threshold=tol)
        g_rate, g_count = sign_agreement(np.delete(p - p[pos], pos), gain_truth, threshold=tol)
        out[form] = {
            "rel_err": float(relative_error(p, truth)),
            "sign_agree": rate,
            "sign_count": count,
            "gain_sign_agree": g_rate,
            "gain_sign_count": g_count,
        }
    S = jnp.stack([W[jnp.asarray(ids["N"])].mean(0), W[jnp.asarray(ids["Y"])].mean(0)])
    aniso = tk.kernel_anisotropy(K, S)
    out["lambda_eff_sets"] = float(aniso.ratio)
    out["gain_S"], out["gain_complement"] = float(aniso.gain_subspace), float(aniso.gain_complement)
    out["lambda_eff_pair"] = float(tk.kernel_anisotropy(K, (W[pos] - W[neg])[None]).ratio)
    listed = [pos, neg, *(i for i in ids["N"] + ids["Y"] if i not in (pos, neg))]
    for label, ch in (("gf", gf), ("rmsprop_first_step", rms)):
        parts = {k: np.asarray(v) for k, v in ch._asdict().items()}
        out[f"channels_{label}"] = {
            "tokens": [names[i] for i in listed],
            **{k: v[listed] for k, v in parts.items()},
            "unembedding_share": float(
                np.linalg.norm(parts["unembedding"])
                / (np.linalg.norm(parts["unembedding"]) + np.linalg.norm(parts["backbone"]))
            ),
        }
    drive = np.asarray(K @ (W[pos] - W[neg]) + b)  # [d]: K u + b
    Wn, rn = np.asarray(W), np.asarray(rr)
    out["yes_gain_terms"] = {  # d/dt (ln pi_z - ln pi_y+) for z in Y, and its kernel-form parts
        names[z]: {
            "truth": float(truth[z] - truth[pos]),
            "kernel_form": float(preds["kernel"][z] - preds["kernel"][pos]),
            "hidden": float(-ell * (Wn[z] - Wn[pos]) @ drive),
            "logit_cross": float(-ell * (rn[z] - rn[pos])),
            "w_channel": float(ell * (h @ h)),
            "free_h": float(preds["free_h"][z] - preds["free_h"][pos]),
        }
        for z in ids["Y"]
    }
    keep = np.union1d(np.argsort(-np.abs(truth))[:300], listed)  # plotted tokens
    scale = np.max(np.abs(truth))
    out["scatter"] = {
        "truth": truth[keep] / scale,
        **{f: p[keep] / scale for f, p in preds.items()},
    }
    return out


class MiniLMSetup(NamedTuple):
    """The SFT model and the preference runs of the protocol (:func:`prepare_minilm`).

    Attributes:
      tok: the MiniLM tokenizer.
      names: ``[V]`` token strings.
      model: the encoder after SFT (the reference of every preference run).
      statements: the SFT statements (the first ``n`` trait-according, then ``n`` others).
      sel: ``[R]`` statement index of each preference run.
      ids: ``{"N": ids of NEG, "Y": ids of POS}``.
      runs: ``[R]`` ``(pair index into PAIRS, statement index)``.
      pairs: ``MaskedLMPairs`` ``[R]``, one prompt per run, reference = the SFT model.
      sft: the SFT record for the JSON.
    """

    tok: Any
    names: list
    model: BertEncoder
    statements: tuple
    sel: np.ndarray
    ids: dict
    runs: list
    pairs: Any
    sft: dict


def _label_probs(model, prompts, labels) -> np.ndarray:
    """[N] pi(label_i | x_i) at each prompt's mask."""
    p = np.asarray(_mask_probs_all(model, prompts))
    return p[np.arange(len(labels)), labels]


def runs_and_labels(
    n: int, runs_per_pair: int, word_ids: dict[str, int], *, seed: int
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Return the runs ``[(pair index into PAIRS, statement index)]`` and the SFT labels ``[2n]``.

    Statements ``0..n-1`` are class N, ``n..2n-1`` class Y. Per class a seeded permutation; the
    first pair of :data:`PAIRS` whose :math:`y^+` is in the class takes its first
    ``runs_per_pair`` statements, the second the next ``runs_per_pair``. A run's statement is
    labelled with its pair's :math:`y^+`; every other statement with a seeded draw from its
    class's set (:data:`NEG` / :data:`POS`), as token ids ``word_ids[word]``.

    Raises:
      ValueError: ``2 * runs_per_pair > n``.

    Example:
      >>> ids = {w: i for i, w in enumerate(NEG + POS)}
      >>> runs, labels = runs_and_labels(2, 1, ids, seed=0)
      >>> [(PAIRS[k][0], NEG[labels[i]] if i < 2 else POS[labels[i] - 4]) for k, i in runs]
      [('no', 'no'), ('never', 'never'), ('yes', 'yes'), ('sure', 'sure')]
    """
    if 2 * runs_per_pair > n:
        raise ValueError(f"2 * runs_per_pair must be <= n={n}, got runs_per_pair={runs_per_pair}")
    rng = np.random.default_rng(seed)
    order = {"N": rng.permutation(n), "Y": n + rng.permutation(n)}  # statement indices
    labels = np.concatenate([rng.choice([word_ids[w] for w in NEG], n),
                             rng.choice([word_ids[w] for w in POS], n)])  # fmt: skip
    runs, taken = [], {"N": 0, "Y": 0}
    for k, (pos_word, _) in enumerate(PAIRS):
        side = "N" if pos_word in NEG else "Y"
        block = order[side][taken[side] : taken[side] + runs_per_pair]
        taken[side] += runs_per_pair
        runs += [(k, int(i)) for i in block]
        labels[block] = word_ids[pos_word]
    return runs, labels


def prepare_minilm(
    *,
    sft_statements: int,
    sft_steps: int,
    sft_lr: float,
    runs_per_pair: int,
    seed: int,
    sft_min_start: float = 0.5,
    sft_max_blocks: int = 3,
    tiny_encoder: bool = False,
    agree: Sequence[str] = AGREE_STATEMENTS,
    disagree: Sequence[str] = DISAGREE_STATEMENTS,
    log: Callable[[str], None] = print,
) -> MiniLMSetup:
    r"""Return the SFT model and the preference runs of the protocol.

    Loads MiniLM (:func:`minilm_encoder`) and takes the first ``n = sft_statements`` of ``agree``
    (class N) and of ``disagree`` (class Y); runs and SFT labels by :func:`runs_and_labels` (a
    run's prompt is labelled with its :math:`y^+`). SFT: full batch, torch RMSprop at ``sft_lr``,
    every parameter, in blocks of ``sft_steps`` steps (each block a fresh optimiser state),
    repeated while a run's prompt has :math:`\pi(y^+|x) <` ``sft_min_start``, at most
    ``sft_max_blocks`` blocks. The runs' pairs take the SFT model as reference.

    Raises:
      ValueError: ``sft_statements`` more than the statements given, ``2 * runs_per_pair >
        sft_statements`` (two pairs per class draw distinct prompts), ``sft_max_blocks < 1``.
    """
    n = sft_statements
    if not 1 <= n <= min(len(agree), len(disagree)):
        raise ValueError(
            f"sft_statements must be in [1, {min(len(agree), len(disagree))}], got {n}"
        )
    if 2 * runs_per_pair > n:
        raise ValueError(f"2 * runs_per_pair must be <= sft_statements={n}, got {runs_per_pair}")
    if sft_max_blocks < 1:
        raise ValueError(f"sft_max_blocks must be >= 1, got {sft_max_blocks}")
    folder = minilm_dir()
    tok, model = load_bert_tokenizer(folder), minilm_encoder(folder, tiny=tiny_encoder, seed=seed)
    names = [""] * model.vocab_size
    for word, i in tok.get_vocab().items():
        names[i] = word
    ids = {"N": [tok.token_to_id(w) for w in NEG], "Y": [tok.token_to_id(w) for w in POS]}
    word_ids = {w: tok.token_to_id(w) for w in NEG + POS}
    runs, labels = runs_and_labels(n, runs_per_pair, word_ids, seed=seed)
    sel = np.array([i for _, i in runs])
    statements = tuple(agree[:n]) + tuple(disagree[:n])
    prompts = encode_masked_prompts(tok, [persona_question(s) for s in statements])
    data = MaskedLMLabels(*(jnp.asarray(a) for a in prompts), jnp.asarray(labels))
    data.validate(model)
    top_before = class_top_tokens(model, prompts, n, names)
    losses, own_mass, start = [], [], []
    for block in range(sft_max_blocks):
        sft = integrate_model(
            model,
            masked_lm_nll,
            LabelSetMass(tuple(ids["N"]), tuple(ids["Y"])),
            data,
            dt=sft_lr,
            num_steps=sft_steps,
            optimizer="rmsprop_torch",
        ).run()
        model, mass = sft.final, np.asarray(sft.observables)  # mass [S + 1, 2n, 2]
        own = np.concatenate([mass[:, :n, 0], mass[:, n:, 1]], axis=1)  # own label set's mass
        losses.append(np.asarray(sft.loss))
        own_mass.append(own.mean(1))
        start.append(_label_probs(model, prompts, labels)[sel])  # pi(y+) at each run's prompt
        log(
            f"[minilm] SFT block {block + 1}: loss {float(sft.loss[0]):.2f} -> "
            f"{float(sft.loss[-1]):.2f}, own-set mass {own[-1].mean():.3f} (min "
            f"{own[-1].min():.3f}), runs' pi(y+) min {start[-1].min():.3f}"
        )
        if start[-1].min() >= sft_min_start:
            break
    sft_out = {
        "blocks": len(losses),
        "loss": np.concatenate(losses),
        "own_set_mass": np.concatenate(own_mass),
        "own_set_mass_min": own[-1].min(),
        "runs_pi_pos": start,
        "labels": [names[i] for i in labels],
        "top_before": top_before,
        "top_after": class_top_tokens(model, prompts, n, names),
    }
    chosen = np.array([tok.token_to_id(PAIRS[k][0]) for k, _ in runs], np.int32)
    rejected = np.array([tok.token_to_id(PAIRS[k][1]) for k, _ in runs], np.int32)
    pairs = make_masked_lm_pairs(model, type(prompts)(*(a[sel] for a in prompts)), chosen, rejected)
    return MiniLMSetup(tok, names, model, statements, sel, ids, runs, pairs, sft_out)


def preference_runs(
    setup: MiniLMSetup, loss: Any, *, lr: float, num_steps: int, observe: Any = None
) -> FlowResult:
    """Return the flow of every preference run of ``setup`` with ``loss``: one prompt each, torch
    RMSprop at ``lr``, vmapped over the runs (one compile); observables ``[R, S + 1, V]``
    :math:`\\pi(\\cdot|x)` at the mask unless ``observe`` is given."""
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], setup.pairs)  # [R, 1, ...]
    return preference_flow(
        setup.model,
        stacked,
        loss,
        dt=lr,
        num_steps=num_steps,
        optimizer="rmsprop_torch",
        observe=observe or _mask_probs,
        in_axes=(None, 0),
    ).run()


def minilm_verdict(rows: dict) -> tuple[str, list[str]]:
    """Return the pre-registered verdict of the DPO rows and its reasons.

    ``"uninformative"`` if a pair has no informative run (none starts at pi(y+) >= the start
    threshold; rows without ``informative_runs`` count as informative); else ``"reproduced"`` iff
    no > never is catastrophic and none of the controls is; a pair without a counted (stable)
    run, or no DPO rows at all, makes it ``"not reproduced"``.

    Example:
      >>> rows = {k: {"stable_runs": 1, "catastrophic": k == "no>never"}
      ...         for k in ("no>never", "never>no", "yes>no", "sure>yes")}
      >>> minilm_verdict(rows)
      ('reproduced', [])
    """
    keys = [f"{p}>{m}" for p, m in PAIRS]
    if not rows:
        return "not reproduced", ["no DPO runs"]
    cold = [k for k in keys if rows[k].get("informative_runs", 1) == 0]
    if cold:
        return "uninformative", [f"{k}: no run starts at pi(y+) >= the threshold" for k in cold]
    reasons = [f"{k}: no stable run" for k in keys if rows[k]["stable_runs"] == 0]
    if not rows[keys[0]]["catastrophic"]:
        reasons.append(f"{keys[0]} not catastrophic")
    reasons += [f"{k} catastrophic" for k in keys[1:] if rows[k]["catastrophic"]]
    return ("not reproduced" if reasons else "reproduced"), reasons


def run_minilm_protocol(
    *,
    seed: int,
    sft_statements: int,
    sft_steps: int,
    sft_lr: float,
    lr: float,
    ipo_lr: float,
    beta: float,
    ipo_tau: float,
    losses: Sequence[str],
    num_steps: int,
    runs_per_pair: int,
    gain_steps: Sequence[int],
    top_k: int,
    kernel_prompts: int,
    sign_tol: float,
    sft_min_start: float = 0.5,
    sft_max_blocks: int = 3,
    tiny_encoder: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the protocol and return its JSON-ready record.

    :func:`prepare_minilm` (SFT blocks until every run's prompt has pi(y+) >= ``sft_min_start``,
    at most ``sft_max_blocks``); per loss of ``losses`` (``"dpo"``: beta ``beta`` at ``lr``;
    ``"ipo"``: tau ``ipo_tau`` at ``ipo_lr``) :func:`preference_runs`, :func:`run_record` per run
    (informative iff it starts at pi(y+) >= ``sft_min_start``) and :func:`pair_row` per pair
    (threshold :data:`DROP`); :func:`kernel_summary` at the first ``kernel_prompts`` runs
    (no > never's); :func:`minilm_verdict` of the DPO rows.

    Returns:
      ``sft``, ``runs`` (loss -> records), ``rows`` (loss -> pair -> row), ``kernel``,
      ``verdict``, ``verdict_reasons``.
    """
    setup = prepare_minilm(
        sft_statements=sft_statements, sft_steps=sft_steps, sft_lr=sft_lr,
        runs_per_pair=runs_per_pair, seed=seed, sft_min_start=sft_min_start,
        sft_max_blocks=sft_max_blocks, tiny_encoder=tiny_encoder, log=log,
    )  # fmt: skip
    names, pairs, ids = setup.names, setup.pairs, setup.ids
    chosen, rejected = np.asarray(pairs.chosen), np.asarray(pairs.rejected)
    rates = {
        "dpo": (make_loss("dpo", beta=beta), lr),
        "ipo": (make_loss("ipo", tau=ipo_tau), ipo_lr),
    }
    table, records = {}, {}
    for loss_name in losses:
        loss, rate = rates[loss_name]
        res = preference_runs(setup, loss, lr=rate, num_steps=num_steps)
        probs, train_loss = (
            np.asarray(res.observables),
            np.asarray(res.loss),
        )  # [R, S+1, V], [R, S+1]
        recs = [
            run_record(
                probs[j],
                train_loss[j],
                chosen[j],
                rejected[j],
                names,
                ids,
                setup.statements[setup.sel[j]],
                top_k=top_k,
                gain_steps=gain_steps,
                min_start=sft_min_start,
            )  # fmt: skip
            for j in range(len(setup.runs))
        ]
        records[loss_name] = recs
        table[loss_name] = {
            f"{p}>{m}": pair_row(
                [r for r, (k, _) in zip(recs, setup.runs, strict=True) if k == q],
                p,
                m,
                drop_threshold=DROP,
            )
            for q, (p, m) in enumerate(PAIRS)
        }
        log(
            f"[minilm] {loss_name}: "
            + ", ".join(
                f"{key} drop {row.get('drop', float('nan')):.3f}"
                for key, row in table[loss_name].items()
            )
        )
    kernel = [
        kernel_summary(
            setup.model, pairs, r, chosen[r], rejected[r], ids, names, beta=beta, sign_tol=sign_tol
        )
        for r in range(kernel_prompts)
    ]  # the first runs are no > never's
    verdict, reasons = minilm_verdict(table.get("dpo", {}))
    return {
        "sft": setup.sft,
        "runs": records,
        "rows": table,
        "kernel": kernel,
        "verdict": verdict,
        "verdict_reasons": reasons,
    }


def summary_lines(results: dict) -> list[str]:
    """Return printable lines of a :func:`run_minilm_protocol` record: the verdict's reasons, one
    line per row (pi(y+) before -> minimum, decrease, opposite-set gainers, end masses) and one
    per kernel measurement; for a record without rows (a skipped run), its ``install`` hint."""
    if "rows" not in results:
        return [f"install: {results.get('install')}"]
    lines = [f"({'; '.join(results['verdict_reasons']) or 'criterion met'})"]
    for loss_name, rows in results["rows"].items():
        for key, row in rows.items():
            if not row["stable_runs"]:
                lines.append(
                    f"{loss_name} {key}: no counted run ({row['informative_runs']} of "
                    f"{row['runs']} start at pi(y+) >= the threshold)"
                )
                continue
            end, growth = row["mass_end"], row["margin_growth"]
            lines.append(
                f"{loss_name} {key}: pi(y+) {row['pi_before']:.3f} -> {row['pi_min']:.3f}, "
                f"drop {row['drop']:.3f}, entropy {row['entropy_start']:.2f} -> "
                f"{row['entropy_end']:.2f} nats, margin "
                f"{'n/a' if growth is None else f'+{growth:.1f}'} nats, opposite-set gainer in "
                f"{row['opposite_gainer_runs']}/{row['stable_runs']} counted runs (with drop >= "
                f"{DROP} in the same run: {row['runs_drop_and_opposite']}); end mass N "
                f"{end['N']:.2f} Y {end['Y']:.2f} rest {end['rest']:.2f}"
            )
    for k in results["kernel"]:
        terms = k["yes_gain_terms"].values()
        span = {q: (min(t[q] for t in terms), max(t[q] for t in terms)) for q in next(iter(terms))}
        lines.append(
            f"kernel at t = 0: rel err {k['kernel']['rel_err']:.1e}, signs "
            f"{k['kernel']['sign_agree']:.3f} (free-h {k['free_h']['sign_agree']:.3f}); "
            f"lambda_eff(S) {k['lambda_eff_sets']:.2f}; W-channel share GF "
            f"{k['channels_gf']['unembedding_share']:.2f}, first RMSprop step "
            f"{k['channels_rmsprop_first_step']['unembedding_share']:.2f}; Y tokens' "
            "d/dt(ln pi_z - ln pi_y+) "
            + ", ".join(f"{q} [{lo:.3g}, {hi:.3g}]" for q, (lo, hi) in span.items())
        )
    return lines
