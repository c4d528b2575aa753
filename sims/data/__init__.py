"""Data generators: a vocabulary with meaningful unembeddings (``vocab``), the toy grammar of the
transformer experiments (``corpus``), synthetic multi-token preferences (``synthetic``) and MiniLM's
real token embeddings (``real_embeddings``)."""

from sims.data.corpus import is_refusal, pack, pretraining_corpus
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
    "MINILM_INSTALL",
    "RealEmbeddings",
    "SyntheticPreferences",
    "is_refusal",
    "load_minilm",
    "minilm_available",
    "pack",
    "pretraining_corpus",
    "semantic_unembeddings",
    "synthetic_preferences",
    "token_ids",
    "word_subset",
]
