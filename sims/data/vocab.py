r"""A small vocabulary whose unembeddings carry meaning, for the "No over Never" experiment.

Construction (stated so results can be judged): pick orthonormal *concept directions* in
:math:`\mathbb R^d` (a random rotation of the first axes): ``polarity`` (+ yes, - no),
``emphasis``, ``hedge`` (uncertainty), ``polite``, ``informal``, and a shared ``answer`` direction
(all answer tokens share it, as real unembeddings of related words are anisotropic). Each answer
token is ``concept_scale`` times a fixed combination of concepts (:data:`ANSWER_TOKENS`) plus
isotropic noise of norm about ``noise``; ``num_filler`` unrelated tokens are pure noise of norm
about ``filler_norm``. Only ``No`` and ``Never`` change between geometries (:data:`GEOMETRIES`):

* ``catastrophic``: ``Never`` is a *stronger* no (polarity -2.0 vs -0.5), so
  :math:`\langle W_{No}, W_{Never}\rangle > \|W_{No}\|^2` (Theorem 4's negative term) and
  :math:`W_{No} - W_{Never}` points along +polarity: Theorem 5 sends mass to Yes-like tokens.
* ``benign``: both share a large emphasis part (so again :math:`\langle W_{No}, W_{Never}\rangle
  > \|W_{No}\|^2`), ``No`` is more negative and informal, ``Never`` more emphatic: the difference
  (-0.4 polarity + 0.6 informal - 1.1 emphasis) is negative on Yes-like tokens and favours the
  hedges and informal no-tokens: mass stays within the No label set and its synonyms.
* ``none``: ``Never`` shares no concept with ``No`` (emphasis + hedge); their alignment is the
  shared answer component only, and Theorem 4's bracket stays positive: ``No`` rises.

Source: the mechanism is Razin et al. 2024, Theorems 4-5 and Takeaway 1 (unembeddings linearly
encode semantics, Park et al. 2024); the numbers are this project's choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from theory.checks import check_positive, check_positive_int

CONCEPTS = ("polarity", "emphasis", "hedge", "polite", "informal", "answer")

#: Concept coefficients of the answer tokens (``answer`` = 1 for all of them).
ANSWER_TOKENS: dict[str, dict[str, float]] = {
    "Yes": {"polarity": 1.0},
    "Yeah": {"polarity": 0.8},
    "Sure": {"polarity": 0.9, "polite": 0.3},
    "Certainly": {"polarity": 1.0, "polite": 0.6, "emphasis": 0.3},
    "Absolutely": {"polarity": 1.1, "emphasis": 0.8},
    "Maybe": {"hedge": 1.0},
    "Perhaps": {"hedge": 1.0, "polite": 0.3},
    "Nope": {"polarity": -0.9, "informal": 0.8},
    "Nah": {"polarity": -0.8, "informal": 1.0},
    "no": {"polarity": -1.0, "informal": 0.5},
}

#: ``No`` and ``Never`` in each geometry.
GEOMETRIES: dict[str, dict[str, dict[str, float]]] = {
    "catastrophic": {
        "No": {"polarity": -0.5},
        "Never": {"polarity": -2.0, "emphasis": 0.5},
    },
    "benign": {
        "No": {"polarity": -1.0, "informal": 0.6, "emphasis": 1.5},
        "Never": {"polarity": -0.6, "emphasis": 2.6},
    },
    "none": {
        "No": {"polarity": -1.0},
        "Never": {"emphasis": 1.0, "hedge": 0.5},
    },
}

#: Label sets of the paper's Persona protocol (Razin et al. 2024, App. H.1).
NO_SET = ("No", "Never", "Maybe", "Perhaps")
YES_SET = ("Yes", "Yeah", "Sure", "Certainly", "Absolutely")
#: Judged by the label sets (as Razin et al. Table 1): for ``No > Never``, mass moving to the Yes
#: set is catastrophic; to the rest of the No set or to No-synonyms it is benign.
CATASTROPHIC_FOR_NO = YES_SET
BENIGN_FOR_NO = ("Maybe", "Perhaps", "Nope", "Nah", "no")


def semantic_unembeddings(
    key: jax.Array,
    *,
    geometry: str,
    hidden_size: int = 32,
    concept_scale: float = 3.0,
    num_filler: int = 40,
    noise: float = 0.15,
    filler_norm: float = 0.5,
    dtype: jnp.dtype = jnp.float64,
) -> tuple[jax.Array, tuple[str, ...]]:
    """Return ``(W, tokens)``: unembeddings ``[V, d]`` and token names, ``V = 12 + num_filler``.

    See the module docstring for the construction.

    Raises:
      ValueError: unknown ``geometry``, ``hidden_size < 6`` (one axis per concept), bad sizes.

    Example:
      >>> W, tokens = semantic_unembeddings(jax.random.key(0), geometry="catastrophic")
      >>> W.shape, tokens[:3]
      ((52, 32), ('Yes', 'Yeah', 'Sure'))
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {sorted(GEOMETRIES)}, got geometry={geometry!r}")
    check_positive_int("hidden_size", hidden_size)
    if hidden_size < len(CONCEPTS):
        raise ValueError(f"hidden_size must be >= {len(CONCEPTS)}, got hidden_size={hidden_size}")
    check_positive_int("num_filler", num_filler)
    check_positive("concept_scale", concept_scale)
    check_positive("noise", noise)
    check_positive("filler_norm", filler_norm)
    k_rot, k_noise, k_fill = jax.random.split(key, 3)
    basis, _ = jnp.linalg.qr(jax.random.normal(k_rot, (hidden_size, hidden_size), dtype))
    directions = basis[:, : len(CONCEPTS)].T  # [concepts, d]
    table = dict(ANSWER_TOKENS) | GEOMETRIES[geometry]
    tokens = tuple(table)
    coeffs = jnp.array(
        [[table[t].get(c, 1.0 if c == "answer" else 0.0) for c in CONCEPTS] for t in tokens], dtype
    )  # [answer tokens, concepts]
    answers = concept_scale * coeffs @ directions + noise / jnp.sqrt(
        hidden_size
    ) * jax.random.normal(k_noise, (len(tokens), hidden_size), dtype)
    fillers = (
        filler_norm
        / jnp.sqrt(hidden_size)
        * jax.random.normal(k_fill, (num_filler, hidden_size), dtype)
    )
    names = tokens + tuple(f"<filler{i}>" for i in range(num_filler))
    return jnp.concatenate([answers, fillers]), names
