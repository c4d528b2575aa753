"""Helpers of learned_features_no_over_never: data, lr rules, t = 0 measurements, cell summaries.

Everything here is glue of that one experiment (its module docstring states the protocol): the
persona statements and their MiniLM features, the grid rule for learning rates, the SFT phase, the
jitted t = 0 measurements (hidden kernels, true velocity, kernel and free-h predictions) and the
per-cell numbers the JSON and the verdict are made of.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.analysis.gainers import gainers_at, largest_decrease
from sims.analysis.kernel import hidden_kernel, rmsprop_preconditioner, velocity_channels
from sims.analysis.scores import pearson
from sims.analysis.summaries import (
    relative_error,
    sign_agreement,
    statistic,
)
from sims.data.real_embeddings import load_minilm, minilm_dir, word_subset
from sims.models.bert import load_bert_tokenizer
from sims.models.mlp_features import feature_sft_flow
from theory.kernel import kernel_anisotropy, preconditioned_logprob_velocity
from theory.losses import margin_derivative, mean_pair_loss
from theory.single_token import logprob_velocity

NEG = ("no", "never", "maybe", "perhaps")  # label set N (trait-according prompts)
POS = ("yes", "yeah", "sure", "certainly", "absolutely")  # label set Y ("yes-like")
PAIRS = (("no", "never"), ("never", "no"), ("yes", "no"), ("sure", "yes"))  # target first
VICES = ("lying", "cheating", "stealing", "bribery", "revenge", "deceit", "fraud", "cruelty")
VIRTUES = ("honesty", "kindness", "fairness", "patience", "courage", "charity", "generosity",
           "loyalty")  # fmt: skip
PREDICATES = ("fine", "good", "acceptable", "useful")
REPORT_STEPS = (5, 25, 100)  # steps of Tables 4-12
LR_GRID = tuple(10.0 ** (k / 4) for k in range(-28, -3))  # 1e-7 ... 10^-1, quarter decades
#: Most runs per pair: 32 Y prompts get balanced labels, so ``sure`` labels 6 of them.
MAX_RUNS = 6
#: Signs are compared where |truth| > SIGN_TOL * max |truth| (below: not resolved).
SIGN_TOL = 1e-6


class Data(NamedTuple):
    """Everything a cell needs: W, words, prompts, labels, the held-out prompt, the runs."""

    W: np.ndarray  # [V, d] float64 MiniLM rows kept
    words: list[str]  # V token strings
    ids: dict[str, int]  # label word -> row of W
    texts: list[str]  # P statements
    features: np.ndarray  # [P, f]
    labels: np.ndarray  # [P] row ids of the SFT labels
    held_out: int  # prompt of the lr rule (trait-according, label no, in no run)
    runs: tuple[np.ndarray, np.ndarray, np.ndarray]  # features [4R, f], y+ [4R], y- [4R]
    run_prompts: np.ndarray  # [4R] prompt index of each run (pairs in PAIRS order, R each)
    S: np.ndarray  # [2, d] centroids of the N and Y rows of W


def build_data(config: Any) -> Data:
    """MiniLM rows and statement features, balanced SFT labels, held-out prompt and run prompts."""
    emb = load_minilm()
    if config.vocab_size:
        keep = word_subset(emb.vocab, NEG + POS, size=config.vocab_size)
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
    rng = np.random.default_rng(config.seed)
    labels = np.empty(len(texts), np.int64)
    for mask, names in ((accords, NEG), (~accords, POS)):
        labels[mask] = rng.permutation(np.resize([ids[w] for w in names], int(mask.sum())))
    order = rng.permutation(len(texts))
    held_out = next(int(i) for i in order if accords[i] and labels[i] == ids["no"])
    run_prompts = []
    for yp, _ in PAIRS:
        eligible = [int(i) for i in order if labels[i] == ids[yp] and i != held_out]
        run_prompts += eligible[: config.runs_per_pair]
    run_prompts = np.array(run_prompts)
    R = config.runs_per_pair
    pos = np.repeat([ids[yp] for yp, _ in PAIRS], R)
    neg = np.repeat([ids[yn] for _, yn in PAIRS], R)
    S = np.stack([W[[ids[w] for w in NEG]].mean(0), W[[ids[w] for w in POS]].mean(0)])
    return Data(W, words, ids, texts, X, labels, held_out, (X[run_prompts], pos, neg),
                run_prompts, S)  # fmt: skip


def grid_search(score, target: float) -> dict:
    """Smallest LR_GRID lr with ``score(lr) >= target``, by bisection (assumes monotone).

    Returns ``lr``, ``met`` (False: no grid lr reached the target; the top lr is used), and every
    evaluated ``(lr, score)``; the grid point below the chosen one is among them unless it is the
    grid's first.
    """
    lo, hi, seen = -1, len(LR_GRID), {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        seen[mid] = score(LR_GRID[mid])
        lo, hi = (lo, mid) if seen[mid] >= target else (mid, hi)
    met = hi < len(LR_GRID)
    index = hi if met else len(LR_GRID) - 1
    evaluated = [[LR_GRID[i], s if np.isfinite(s) else None] for i, s in sorted(seen.items())]
    return {"lr": LR_GRID[index], "met": met, "evaluated": evaluated}


def sft(model0, data: Data, config: Any):
    """SFT at the grid rule's lr; returns the SFT model and its numbers."""
    finals = {}

    def score(lr):
        res = feature_sft_flow(
            model0, data.features, data.labels, dt=lr, num_steps=config.sft_steps,
            record_every=config.sft_steps, optimizer="rmsprop_torch",
        ).run()  # fmt: skip
        finals[lr] = res
        return float(np.mean(np.exp(np.asarray(res.observables)[-1])))

    rule = grid_search(score, config.sft_target)
    if rule["lr"] not in finals:
        score(rule["lr"])
    res = finals[rule["lr"]]
    pi = np.exp(np.asarray(res.observables)[-1])  # [P]
    model = res.final
    change = {
        name: float(
            np.linalg.norm(getattr(model, name)[...] - getattr(model, f"{name}_init")[...])
            / np.linalg.norm(getattr(model, f"{name}_init")[...])
        )
        for name in ("fc_in", "fc_out")
    }
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


def kernels(model, X: np.ndarray) -> tuple[np.ndarray, float]:
    """Kernels K = J J^T (gradient flow) at each prompt ``[R, d, d]`` (the model's closed form),
    and the relative error of the first against :func:`sims.analysis.kernel.hidden_kernel`."""
    graphdef, state = nnx.split(model)
    K, measured = _kernels(graphdef, state, jnp.asarray(X))
    return np.asarray(K), float(relative_error(K[0], measured))


def _lambda_eff(K, S) -> np.ndarray:
    return np.asarray(jax.vmap(kernel_anisotropy, in_axes=(0, None))(jnp.asarray(K), S).ratio)


def kernel_change(K_init: np.ndarray, K_start: np.ndarray, S: np.ndarray) -> dict:
    """lambda_eff on S before and after SFT, and the relative kernel change (Frobenius)."""
    rel = np.linalg.norm(K_start - K_init, axis=(1, 2)) / np.linalg.norm(K_init, axis=(1, 2))
    return {
        "lambda_eff_before_sft": float(np.mean(_lambda_eff(K_init, S))),
        "lambda_eff_after_sft": float(np.mean(_lambda_eff(K_start, S))),
        "relative_kernel_change": float(np.mean(rel)),
    }


@partial(jax.jit, static_argnums=(0, 1, 2))
def measure(graphdef, loss, trained, state, X, pos, neg):
    """t = 0 of each run: true velocity along -P grad L (torch RMSprop's first step), its W channel,
    the kernel-form and free-h predictions, K_P, h and l'."""
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
    # the closed-form K_P of the first run against the measured one
    # (sims.analysis.kernel.hidden_kernel)
    P0 = rmsprop_preconditioner(lambda m: _first_loss(m, loss, X[0], pos[0], neg[0]), model)
    out["K_P_measured_first"] = hidden_kernel(lambda m: m.hidden(X[0]), model, preconditioner=P0)
    return out


def _first_loss(m, loss, x, y_pos, y_neg):
    """The preference loss of one run at t = 0 (reference = the model now)."""
    lp = m(x[None])[0]
    ref = jax.lax.stop_gradient(lp)
    return mean_pair_loss(loss, lp[y_pos], lp[y_neg], ref[y_pos], ref[y_neg])


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


def _run(probs, logp, at0, r, yp, yn, K_start, lam, lr, data) -> dict:
    """Numbers of one run (``probs``/``logp`` ``[T+1, V]``)."""
    ip, ineg = data.ids[yp], data.ids[yn]
    yes_like = {w for w in POS if w not in (yp, yn)}
    same, other = (POS, NEG) if yp in POS else (NEG, POS)
    gainers = gainers_at(probs, data.words, k=3, checkpoints=REPORT_STEPS)
    names = {n for step in gainers for n, _ in step}
    u = data.W[ip] - data.W[ineg]
    align = {
        "K_P": data.W @ (at0["K_P"][r] @ u),
        "K": data.W @ (K_start[r] @ u),
        "free_h": data.W @ u,
    }
    yes_rows = [data.ids[w] for w in sorted(yes_like)]
    truth = at0["truth"][r]
    return {
        "prompt": data.texts[data.run_prompts[r]],
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
        "lambda_eff": [float(x[r]) for x in lam],  # K before SFT, K at start, K_P at start
        "kernel_vs_truth": _compare(at0["kernel"][r], truth),
        "free_h_vs_truth": _compare(at0["free_h"][r], truth),
        "first_step_vs_truth": float(relative_error((logp[1] - logp[0]) / lr, truth)),
        "w_channel_share": float(np.max(np.abs(at0["w_channel"][r])) / np.max(np.abs(truth))),
        "rank_pos": {k: _rank(a, ip) for k, a in align.items()},
        "rank_best_yes_like": {k: min(_rank(a, i) for i in yes_rows) for k, a in align.items()},
        "top_aligned_K_P": [data.words[i] for i in np.argsort(-align["K_P"])[:3]],
    }


def summarise_cell(logp, at0, lr, data: Data, config: Any, K_start, K_init) -> dict:
    """Per-pair numbers of one (arm, init, loss): runs, their means, the EFFECT flag."""
    at0 = {k: np.asarray(v) for k, v in at0.items()}
    probs = np.exp(logp)  # [4R, T+1, V]
    R = config.runs_per_pair
    lam = [_lambda_eff(K, data.S) for K in (K_init, K_start, at0["K_P"])]  # 3 x [4R]
    pairs = {}
    for j, (yp, yn) in enumerate(PAIRS):
        runs = [
            _run(probs[r], logp[r], at0, r, yp, yn, K_start, lam, lr, data)
            for r in range(j * R, (j + 1) * R)
        ]
        drop = float(np.mean([x["max_drop"] for x in runs]))
        yes_runs = sum(x["yes_like_gainer"] for x in runs)
        counts = {}
        for s, step in enumerate(REPORT_STEPS):
            c = Counter(n for x in runs for n, _ in x["gainers"][s])
            counts[str(step)] = {n: k for n, k in c.most_common()}
        pairs[f"{yp}>{yn}"] = {
            "runs": runs,
            "pi_pos_mean": np.mean([x["pi_pos"] for x in runs], axis=0),
            "pi_pos_start_mean": float(np.mean([x["pi_pos_start"] for x in runs])),
            "pi_pos_min_mean": float(np.mean([x["pi_pos_min"] for x in runs])),
            "max_drop_mean": drop,
            "yes_like_gainer_runs": int(yes_runs),
            "effect": bool(drop >= config.drop_threshold and 2 * yes_runs >= R),
            "gainer_counts": counts,
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
        }
    closed = float(relative_error(at0["K_P"][0], at0["K_P_measured_first"]))
    return {"lr": lr, "pairs": pairs, "K_P_closed_form_vs_measured": closed}


def cell_verdict(cell: dict) -> str:
    """'reproduced' iff the EFFECT holds for no>never and for none of the controls."""
    pairs = cell["pairs"]
    target = pairs["no>never"]["effect"]
    controls = [v["effect"] for k, v in pairs.items() if k != "no>never"]
    return "reproduced" if target and not any(controls) else "not reproduced"


def cell_line(cell: dict) -> str:
    """One printed line per cell: lr and, per pair, drop / yes-like runs / lambda_eff."""
    parts = [f"lr {cell['lr']:.3g}"]
    for k, v in cell["pairs"].items():
        parts.append(
            f"{k} start {v['pi_pos_start_mean']:.2f} drop {v['max_drop_mean']:.2f} "
            f"yes-like {v['yes_like_gainer_runs']}/{len(v['runs'])} "
            f"lam K {v['lambda_eff_K']['mean']:.2f} K_P {v['lambda_eff_KP']['mean']:.2f} "
            f"rank y+ {v['rank_pos_K_P']['mean']:.0f}"
        )
    return "; ".join(parts)
