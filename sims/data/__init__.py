"""Data generators: a vocabulary with meaningful unembeddings (``vocab``), the toy grammar of the
transformer experiments (``corpus``), synthetic multi-token preferences (``synthetic``), MiniLM's
real token embeddings (``real_embeddings``), and the written prompts of the refusal experiment
with their train/test split (``prompts``: benign instructions, SORRY-Bench-style unsafe
requests). The hand-labelled replies that check the refusal judge are read module-qualified as
``sims.data.refusal_labels.DEV`` / ``.HELD_OUT`` (names too generic to export here)."""

from sims.data.corpus import is_refusal, pack, pretraining_corpus
from sims.data.prompts import (
    GENERAL_INSTRUCTIONS,
    SORRY_BENCH_CATEGORIES,
    SORRY_BENCH_DOMAINS,
    UNSAFE_REQUESTS,
    split_train_test,
)
from sims.data.real_embeddings import (
    MINILM_INSTALL,
    RealEmbeddings,
    load_minilm,
    minilm_available,
    token_ids,
    word_subset,
)
from sims.data.synthetic import SyntheticPreferences, synthetic_preferences
from sims.data.vocab import semantic_unembeddings

__all__ = [
    "GENERAL_INSTRUCTIONS",
    "MINILM_INSTALL",
    "RealEmbeddings",
    "SyntheticPreferences",
    "is_refusal",
    "load_minilm",
    "minilm_available",
    "pack",
    "pretraining_corpus",
    "semantic_unembeddings",
    "SORRY_BENCH_CATEGORIES",
    "SORRY_BENCH_DOMAINS",
    "split_train_test",
    "synthetic_preferences",
    "token_ids",
    "UNSAFE_REQUESTS",
    "word_subset",
]
