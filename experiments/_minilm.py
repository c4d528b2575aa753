"""Helpers of :mod:`experiments.minilm_encoder_no_over_never` (MiniLM-L6, Table 1 protocol).

The label sets and pairs of the protocol; SFT and the preference runs (:func:`prepare`,
:func:`preference_runs`); the per-run record and Table 1 row (:func:`run_record`,
:func:`pair_row`); the t = 0 kernel measurements (:func:`kernel_summary`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.framework import progress
from sims.analysis.gainers import gainers_at, largest_decrease
from sims.analysis.kernel import (
    hidden_kernel,
    rmsprop_preconditioner,
    tied_cross_terms,
    velocity_channels,
)
from sims.analysis.summaries import (
    relative_error,
    sign_agreement,
)
from sims.data.real_embeddings import minilm_dir
from sims.flows.core import integrate_model, preference_flow
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
from theory import kernel as tk
from theory.losses import make_loss, margin_derivative, mean_pair_loss
from theory.single_token import logprob_velocity

N_SET = ("no", "never", "maybe", "perhaps")  # labels of trait-according prompts (App. H.1)
Y_SET = ("yes", "yeah", "sure", "certainly", "absolutely")  # labels of the others
PAIRS = (("no", "never"), ("never", "no"), ("yes", "no"), ("sure", "yes"))  # (y+, y-); 1st: test
TABLE = "embeddings.word_embeddings"  # the tied W / input-embedding parameter


@dataclass(frozen=True)
class SetMass:
    """Observable: mass on the N and Y label sets at each prompt's mask, ``[N, 2]``."""

    n_ids: tuple
    y_ids: tuple

    def __call__(self, model, data) -> jax.Array:
        p = jnp.exp(model.mask_logprobs(data.tokens, data.mask_position, data.attention_mask))
        return jnp.stack([p[:, self.n_ids].sum(-1), p[:, self.y_ids].sum(-1)], -1)


def mask_probs(model, pairs) -> jax.Array:
    """[V] pi(.|x) at the mask of a one-prompt run (pairs fields [1, ...])."""
    return jnp.exp(pairs.record(model)[0])


@partial(jax.jit, static_argnums=(0, 1))
def measure_t0(graphdef, loss, state, tokens, attention_mask, mask_position, y_pos, y_neg):
    """Truth (GF and first RMSprop step, by channel), K, tied cross terms, h, l' at one prompt."""
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


def encoder(config, folder) -> BertEncoder:
    """The pretrained MiniLM encoder, or (``config.tiny_encoder``) a random tiny one for smoke."""
    if not config.tiny_encoder:
        return load_bert(folder)
    return BertEncoder(_tiny(folder), rngs=nnx.Rngs(config.seed))


def _tiny(folder) -> BertConfig:
    """Smoke only: a random one-layer encoder, d = 16, on MiniLM's vocabulary."""
    return BertConfig(BertConfig.from_file(folder).vocab_size, 16, 1, 2, 32, 64, 2, 1e-12)


def abstract_encoder(config, folder) -> BertEncoder:
    """:func:`encoder`'s model from shapes (``nnx.eval_shape``; no weights read)."""
    if config.tiny_encoder:
        return nnx.eval_shape(lambda: BertEncoder(_tiny(folder), rngs=nnx.Rngs(config.seed)))
    cfg = BertConfig.from_file(folder)
    return nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))  # as load_bert builds it


@jax.jit
def mask_probs_all(model, prompts) -> jax.Array:
    """[N, V] pi(.|x) at every prompt's mask (one compiled call, not op-by-op)."""
    return jnp.exp(
        model.mask_logprobs(prompts.tokens, prompts.mask_position, prompts.attention_mask)
    )


def class_top(model, prompts, n, names, k=8) -> list:
    """Top-k tokens of the mean pi over the N-class (first n) and Y-class prompts."""
    p = np.asarray(mask_probs_all(model, prompts))
    return [
        [[names[i], float(m[i])] for i in np.argsort(-m)[:k]]
        for m in (p[:n].mean(0), p[n:].mean(0))
    ]


def run_record(probs, loss, pos, neg, names, ids, config, prompt) -> dict:
    """One preference run: pi(y+) series, stability, decrease, top gainers, opposite flag, the
    mass on the N set, the Y set and the rest of the vocabulary, and the entropy of pi (nats)."""
    pw, nw = names[pos], names[neg]
    opposite = set(Y_SET if pw in N_SET else N_SET) - {pw, nw}
    gainers = gainers_at(probs, names, k=config.top_k, checkpoints=config.gain_steps)
    return {
        "pair": f"{pw}>{nw}",
        "prompt": prompt,
        "pi_pos": probs[:, pos],
        "pi_neg": probs[:, neg],
        "loss": loss,
        "stable": bool(np.all(np.diff(loss) < 0)),
        "drop": float(largest_decrease(probs[:, pos])),
        "gainers": dict(zip(map(str, config.gain_steps), gainers, strict=True)),
        "opposite_gainer": any(w in opposite and gain > 0 for g in gainers for w, gain in g),
        "n_mass": probs[:, ids["N"]].sum(-1),
        "y_mass": probs[:, ids["Y"]].sum(-1),
        "entropy": -np.sum(np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-30)), 0), -1),
    }


def pair_row(records, pos_word, neg_word, *, drop_threshold: float) -> dict:
    """Table 1 row over the stable runs: pi(y+) before -> min, decrease, aggregated gainers, and
    the pre-registered flag: catastrophic = mean decrease >= ``drop_threshold`` and an
    opposite-set gainer in at least half of the stable runs."""
    stable = [r for r in records if r["stable"]]
    same = N_SET if pos_word in N_SET else Y_SET
    opposite = Y_SET if pos_word in N_SET else N_SET

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
    row = {"y_pos": pos_word, "y_neg": neg_word, "runs": len(records), "stable_runs": len(stable)}
    if not stable:
        return {**row, "catastrophic": None, "gainers": gainers}
    drop = float(np.mean([r["drop"] for r in stable]))
    hits = sum(r["opposite_gainer"] for r in stable)
    return {
        **row,
        "pi_before": float(np.mean([r["pi_pos"][0] for r in stable])),
        "pi_min": float(np.mean([np.min(r["pi_pos"]) for r in stable])),
        "drop": drop,
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


def kernel_summary(model, pairs, r, pos, neg, ids, names, config) -> dict:
    """t = 0 kernel measurements at run ``r``'s prompt (pair no > never)."""
    graphdef, state = nnx.split(model)
    loss = make_loss("dpo", beta=config.beta)
    fields = (pairs.tokens[r], pairs.attention_mask[r], pairs.mask_position[r])
    gf, rms, K, (b, rr), h, ell = measure_t0(graphdef, loss, state, *fields, pos, neg)
    W = model.unembedding_matrix()
    truth = np.asarray(gf.total)
    preds = {
        "kernel": np.asarray(tk.tied_kernel_logprob_velocity(W, h, K, b, rr, pos, neg, ell)),
        "free_h": np.asarray(logprob_velocity(W, h, pos, neg, ell)),
    }
    tol = config.sign_tol * np.max(np.abs(truth))
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


class Setup(NamedTuple):
    """The SFT model and the preference runs of a config (:func:`prepare`)."""

    tok: Any  # the MiniLM tokenizer
    names: list  # [V] token strings
    model: BertEncoder  # after SFT (the reference of every preference run)
    statements: tuple  # the SFT statements (first n trait-according, then n others)
    sel: np.ndarray  # [R] statement index of each preference run
    ids: dict  # {"N": ids of N_SET, "Y": ids of Y_SET}
    runs: list  # [R] (pair index into PAIRS, statement index)
    pairs: Any  # MaskedLMPairs [R], one prompt per run, reference = the SFT model
    sft: dict  # SFT record for the JSON


def prepare(config, agree: Sequence[str], disagree: Sequence[str]) -> Setup:
    """Load MiniLM, run SFT on ``agree`` (N labels) and ``disagree`` (Y labels) statements,
    draw the preference runs' prompts (seeded), build their pairs (reference = SFT model)."""
    folder = minilm_dir()
    tok, model = load_bert_tokenizer(folder), encoder(config, folder)
    names = [""] * model.vocab_size
    for word, i in tok.get_vocab().items():
        names[i] = word
    ids = {"N": [tok.token_to_id(w) for w in N_SET], "Y": [tok.token_to_id(w) for w in Y_SET]}
    rng = np.random.default_rng(config.seed)
    n = config.sft_statements
    statements = tuple(agree[:n]) + tuple(disagree[:n])
    prompts = encode_masked_prompts(tok, [persona_question(s) for s in statements])
    labels = np.concatenate([rng.choice(ids["N"], n), rng.choice(ids["Y"], n)])
    data = MaskedLMLabels(*(jnp.asarray(a) for a in prompts), jnp.asarray(labels))
    data.validate(model)
    top_before = class_top(model, prompts, n, names)
    sft = integrate_model(
        model,
        masked_lm_nll,
        SetMass(tuple(ids["N"]), tuple(ids["Y"])),
        data,
        dt=config.sft_lr,
        num_steps=config.sft_steps,
        optimizer="rmsprop_torch",
    ).run()
    model, mass = sft.final, np.asarray(sft.observables)  # mass [S + 1, 2n, 2]
    own = np.concatenate([mass[:, :n, 0], mass[:, n:, 1]], axis=1)  # own label set's mass
    progress(
        f"[minilm] SFT: loss {float(sft.loss[0]):.2f} -> {float(sft.loss[-1]):.2f}, own-set "
        f"mass {own[-1].mean():.3f} (min {own[-1].min():.3f})"
    )
    sft_out = {
        "loss": sft.loss,
        "own_set_mass": own.mean(1),
        "own_set_mass_min": own[-1].min(),
        "labels": [names[i] for i in labels],
        "top_before": top_before,
        "top_after": class_top(model, prompts, n, names),
    }
    runs = []  # (pair, prompt index): runs_per_pair distinct prompts of y+'s class per pair
    for k, (pos_word, _) in enumerate(PAIRS):
        offset = 0 if pos_word in N_SET else n
        runs += [(k, offset + int(i)) for i in rng.choice(n, config.runs_per_pair, replace=False)]
    sel = np.array([i for _, i in runs])
    chosen = np.array([tok.token_to_id(PAIRS[k][0]) for k, _ in runs], np.int32)
    rejected = np.array([tok.token_to_id(PAIRS[k][1]) for k, _ in runs], np.int32)
    pairs = make_masked_lm_pairs(model, type(prompts)(*(a[sel] for a in prompts)), chosen, rejected)
    return Setup(tok, names, model, statements, sel, ids, runs, pairs, sft_out)


def loss_and_lr(config, loss_name: str) -> tuple:
    """The preference loss ``loss_name`` (``"dpo"`` or ``"ipo"``) and its RMSprop lr."""
    if loss_name == "dpo":
        return make_loss("dpo", beta=config.beta), config.lr
    return make_loss("ipo", tau=config.ipo_tau), config.ipo_lr


def preference_runs(config, setup: Setup, loss_name: str, observe=None):
    """Run every preference run of ``setup`` (vmapped, one compile) with loss ``loss_name``."""
    loss, lr = loss_and_lr(config, loss_name)
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], setup.pairs)  # [R, 1, ...]
    return preference_flow(
        setup.model,
        stacked,
        loss,
        dt=lr,
        num_steps=config.num_steps,
        optimizer="rmsprop_torch",
        observe=observe or mask_probs,
        in_axes=(None, 0),
    ).run()
