"""The paper's experimental protocols, as library functions: one module per protocol.

Import the module you need (``from sims.protocols import persona``); the names live there, so
that protocols can share words (``run``, ``verdict``) without colliding.

Theory in the unconstrained-features model and its relatives:

* :mod:`~sims.protocols.theory_checks` -- the closed forms of Razin et al. 2024 (Theorems 4-9,
  Propositions 1-2) against autodiff and the simulated flow on random instances; Table 1 and
  Figure 2 in the unconstrained-features model.
* :mod:`~sims.protocols.dpop` -- DPO vs DPOP on an edit-distance-1 pair (Pal et al. 2024, §3).
* :mod:`~sims.protocols.kl_mixture` -- the KL optimum of a mixture: counterexample search,
  corrected census, bounds, amplification, the flow to the tilt.
* :mod:`~sims.protocols.phase_instances`, :mod:`~sims.protocols.phase_flows`,
  :mod:`~sims.protocols.phase_diagram`, :mod:`~sims.protocols.phase_report` -- the displacement
  phase diagram: single-token instances, the t = 0 prediction (Theorems 4-5, Prop. 1) and the
  flow of a cell, sweeps over a grid of cells, its report, and
  :mod:`~sims.protocols.phase_sensitivity` (controls, thresholds, round-off reruns, the paper's
  regime).
* :mod:`~sims.protocols.kernel_checks` -- check tables of the kernel form of Theorems 4-5 against
  the true velocity at t = 0 (MLP features, the toy transformer), the pre-registered verdict.
* :mod:`~sims.protocols.token_geometry` -- the Table 1 / Table 13 protocol on real word
  embeddings as W(0) (unconstrained features: label-set SFT, DPO/IPO runs, gainers).

Networks other than a pretrained causal LM:

* :mod:`~sims.protocols.learned_features` -- no > never with an MLP backbone over MiniLM
  statement features and MiniLM ``W``: grid rate rules with a margin target, the constructed
  vocabulary as positive control, SFT, t = 0 kernel measurements, the EFFECT rule and verdict.
* :mod:`~sims.protocols.minilm` -- the Table 1 protocol on the whole MiniLM-L6 encoder: SFT
  blocks to pi(y+) >= 0.5, single-prompt DPO / IPO runs, Table 1 rows, entropy, t = 0
  tied-kernel measurements, verdict.
* :mod:`~sims.protocols.toy_transformer` -- the corpus-pretrained toy transformer of the
  small-transformer figures: pre-training settings, persona prompts, velocities at t = 0,
  on-policy refusal pairs, sampled refusal rates.

Real checkpoints (Razin et al. 2024 §3, §5, §6):

* :mod:`~sims.protocols.persona` -- the single-token Persona protocol (§3, App. H.1: label-set
  SFT with a budget rule, single-prompt DPO/IPO runs, gainers, verdicts, Table 13, the
  kernel-form prediction of the first step).
* :mod:`~sims.protocols.onpolicy` -- on-policy preference pairs sampled from the model itself.
* :mod:`~sims.protocols.ches` -- Figure 2: CHES and baseline scores, percentile subsets, verdict.
* :mod:`~sims.protocols.unalignment` -- §6: refusal judge on pairs, learning-rate and SFT-term
  rules, refusal rates, verdicts.
* :mod:`~sims.protocols.filtering` -- the §6 data filter: the per-row displacement audit of a
  preference file on a checkpoint, the lowest-ln-CHES fraction, the audit's files.
"""
