"""Flax NNX models, the one gradient-flow integrator, sweeps, real checkpoints and the protocols.

Import from the subpackage that owns a name (nothing is re-exported here, so each name has one
home):

* :mod:`sims.models` -- model families (Flax NNX) and their pairs types: unconstrained features,
  MLP features, prefix trees, a small causal transformer, :class:`~sims.models.decoder.DecoderLM`
  (Llama / Qwen2 / Gemma / OLMo), the MiniLM / BERT encoder, the DPOP logit model, the tabular KL
  objective, KV-cache sampling.
* :mod:`sims.flows` -- the prepared :class:`~sims.flows.core.Flow` of every front end
  (``preference_flow``, ``sft_flow``, ``integrate_model``), the exact reduced and low-rank flows,
  sharded resumable sweeps.
* :mod:`sims.checkpoints` -- Hugging Face folders, llama.cpp GGUF files, packaged models,
  tokenizers and chat templates, the self-made tiny Llama.
* :mod:`sims.analysis` -- CHES and baselines per pair, the displacement audit, the hidden-state
  kernel, gainers, the refusal judge.
* :mod:`sims.data` -- generators and written data: vocabularies, the toy corpus, synthetic
  preferences, MiniLM embeddings, prompts, labelled replies, shipped fixtures.
* :mod:`sims.protocols` -- the papers' protocols as library functions, one module each.
* :mod:`sims.errors` -- :class:`~sims.errors.InputError`, the one user-error type.
"""
