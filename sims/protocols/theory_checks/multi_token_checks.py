r"""Multi-token closed forms (Razin et al. 2024, Theorems 6-7, Propositions 1-2) vs autodiff.

:func:`multi_token_instance` draws one random pair over the prefix tree with another response
``z``; :func:`multi_token_velocity_check` compares the closed forms with
:func:`sims.models.prefix_tree.flow_velocity`; :func:`error_summary` summarises pointwise errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from sims.analysis.summaries import pointwise_relative_error, stack
from sims.models.prefix_tree import (
    PrefixTreePairs,
    extend_prefixes,
    flow_velocity,
    index_prefixes,
    with_reference,
)
from sims.models.unconstrained import UnconstrainedFeatures
from sims.protocols.theory_checks._validation import check_int_at_least
from theory import losses as _losses
from theory.multi_token import other_response_terms, response_logprob_velocity
from theory.regularized import preferred_logprob_velocity

#: Floor of the pointwise relative error in :func:`error_summary`, relative to mean |reference|
#: (keeps exact zeros of the reference finite).
ERROR_FLOOR = 1e-12


class MultiTokenInstance(NamedTuple):
    """One multi-token pair over the prefix tree, with another response ``z``.

    Attributes:
      model: :class:`~sims.models.unconstrained.UnconstrainedFeatures`, one hidden row per prefix.
      pairs: one pair (:class:`~sims.models.prefix_tree.PrefixTreePairs`), reference log-probs
        from ``model`` with :math:`\\mathcal N(0, 1)` added to the chosen one.
      z: ``[1, L_z]`` tokens of the other response.
      z_rows: ``[1, L_z]`` hidden rows of ``z``'s prefixes.
    """

    model: UnconstrainedFeatures
    pairs: PrefixTreePairs
    z: jax.Array
    z_rows: jax.Array


def multi_token_instance(
    rng: np.random.Generator,
    *,
    vocab_size: int,
    hidden_size: int,
    chosen_length: int,
    rejected_length: int,
    shared: int,
    z_length: int,
    z_fresh: bool,
) -> MultiTokenInstance:
    r"""Return a random single-pair multi-token instance (NumPy draws from ``rng``).

    :math:`y^+` and :math:`y^-` share their first ``shared`` tokens and differ at the next one.
    With ``z_fresh`` the first token of ``z`` is neither :math:`y^+_1` nor :math:`y^-_1`
    (Theorem 7's case); otherwise ``z`` starts with :math:`y^+`'s first ``min(L+, L_z - 1)``
    tokens. The scale ``s`` is log-uniform on [0.3, 3]; hidden rows are a common
    :math:`\mathcal N(0, I)` vector plus :math:`s\,\mathcal N(0, I)` (positive inner products,
    as trained hidden states have), rows of ``W`` :math:`\mathcal N(0, s^2/d)`.

    Raises:
      ValueError: lengths below 1, ``shared >= min(L+, L-)``, ``vocab_size < 3``.

    Example:
      >>> inst = multi_token_instance(np.random.default_rng(0), vocab_size=6, hidden_size=2,
      ...     chosen_length=3, rejected_length=2, shared=1, z_length=2, z_fresh=False)
      >>> inst.pairs.chosen.shape, inst.z.shape
      ((1, 3), (1, 2))
    """
    check_int_at_least("vocab_size", vocab_size, 3)
    for name, value in (
        ("hidden_size", hidden_size),
        ("chosen_length", chosen_length),
        ("rejected_length", rejected_length),
        ("z_length", z_length),
    ):
        check_int_at_least(name, value)
    if not 0 <= shared < min(chosen_length, rejected_length):
        raise ValueError(
            f"shared must be in [0, min(chosen_length, rejected_length)), got shared={shared}"
        )
    V, d, Lp, Ln, Lz = vocab_size, hidden_size, chosen_length, rejected_length, z_length
    y_pos = rng.integers(0, V, Lp)
    y_neg = rng.integers(0, V, Ln)
    y_neg[:shared] = y_pos[:shared]
    y_neg[shared] = (y_pos[shared] + rng.integers(1, V)) % V
    if z_fresh:  # Theorem 7: z_1 not in {y+_1, y-_1}
        z = rng.integers(0, V, Lz)
        z[0] = rng.choice(np.setdiff1d(np.arange(V), [y_pos[0], y_neg[0]]))
    else:  # z shares a prefix with y+ (general form)
        z = np.concatenate([y_pos[: min(Lp, Lz - 1)], rng.integers(0, V, Lz)])[:Lz]
    pairs, prefixes = index_prefixes([0], [y_pos], [y_neg])
    z_rows, prefixes = extend_prefixes(prefixes, 0, z)
    P = Lp + Ln + Lz  # table size bound; spare rows are unused
    scale = np.exp(rng.uniform(np.log(0.3), np.log(3.0)))
    hidden = rng.normal(size=d) + scale * rng.normal(size=(P, d))  # positive inner products
    W = scale * rng.normal(size=(V, d)) / np.sqrt(d)
    model = UnconstrainedFeatures.from_arrays(W, hidden)
    pairs = with_reference(model, pairs)
    pairs = pairs._replace(ref_logprob_chosen=pairs.ref_logprob_chosen + rng.normal(size=1))
    return MultiTokenInstance(model, pairs, jnp.asarray(z)[None, :], jnp.asarray(z_rows)[None, :])


def multi_token_velocity_check(
    instances: Sequence[MultiTokenInstance],
    losses: dict[str, _losses.PairLoss],
    *,
    z_fresh: bool,
) -> dict[tuple[str, str], tuple[jax.Array, jax.Array]]:
    r"""Return ``{(loss name, query): (closed form [N], autodiff [N])}`` over equal-shape instances.

    Queries: ``"y_pos"`` (:func:`theory.regularized.preferred_logprob_velocity`: Theorem 6 for a
    loss of the class, Propositions 1-2 for SFT-term, DPOP and SimPO), ``"z_general"``
    (:func:`theory.multi_token.response_logprob_velocity`) and, with ``z_fresh`` and a loss named
    ``"dpo"``, ``"z_theorem7"`` (:math:`a^+` times the bracket of Theorem 7). The reference is
    :func:`sims.models.prefix_tree.flow_velocity` (``jax.grad`` of the actual loss, ``jax.jvp``).
    One jitted, vmapped pass for every loss (compiled once per shapes and losses).

    Source: Razin et al. 2024, Theorems 6-7 (App. D.2), Propositions 1-2 (App. E).

    Raises:
      ValueError: no instances, or instances of different shapes.
    """
    if not instances:
        raise ValueError("instances must hold at least one MultiTokenInstance, got none")
    models = [inst.model for inst in instances]
    splits = [nnx.split(m) for m in models]
    graphdef = splits[0][0]
    shapes = {
        tuple(np.shape(x) for x in jax.tree_util.tree_leaves((s, inst[1:])))
        for (_, s), inst in zip(splits, instances, strict=True)
    }
    if len(shapes) != 1:
        raise ValueError("instances must share one shape (one length case) to be checked together")
    return _multi_token_check(
        stack([s for _, s in splits]),
        stack([inst.pairs for inst in instances]),
        stack([inst.z for inst in instances]),
        stack([inst.z_rows for inst in instances]),
        graphdef=graphdef,
        losses=tuple(losses.items()),
        z_fresh=z_fresh,
    )


@partial(jax.jit, static_argnames=("graphdef", "losses", "z_fresh"))
def _multi_token_check(states, pairs, z, z_rows, *, graphdef, losses, z_fresh):
    def one(state, pairs, z, z_rows):
        model = nnx.merge(graphdef, state)
        W, H = model.unembedding[...], model.hidden[...]
        hp, hn, hz = H[pairs.chosen_prefix[0]], H[pairs.rejected_prefix[0]], H[z_rows[0]]
        yp, yn = pairs.chosen[0], pairs.rejected[0]
        lp = [
            jnp.sum(jax.nn.log_softmax(h @ W.T)[jnp.arange(y.shape[0]), y])
            for h, y in ((hp, yp), (hn, yn))
        ]
        out = {}
        for name, loss in losses:
            want_pos = flow_velocity(
                model, pairs, loss, pairs.chosen, pairs.chosen_prefix, pairs.chosen_mask
            )[0]
            want_z = flow_velocity(model, pairs, loss, z, z_rows, jnp.ones(z.shape, bool))[0]
            a = _losses.loss_coefficients(
                loss, *lp, pairs.ref_logprob_chosen[0], pairs.ref_logprob_rejected[0]
            )
            out[(name, "y_pos")] = (
                preferred_logprob_velocity(W, hp, hn, yp, yn, *a).velocity,
                want_pos,
            )
            out[(name, "z_general")] = (
                response_logprob_velocity(W, hp, hn, yp, yn, hz, z[0], *a),
                want_z,
            )
            if z_fresh and name == "dpo":  # Theorem 7 is stated for losses of the class
                bracket = other_response_terms(W, hp, hn, yp, yn, hz, z[0]).bracket
                out[(name, "z_theorem7")] = (a[0] * bracket, want_z)
        return out

    return jax.vmap(one)(states, pairs, z, z_rows)


class ErrorSummary(NamedTuple):
    """Pointwise relative errors of closed forms against a reference.

    Attributes:
      count: number of values.
      max_rel_error: largest pointwise relative error.
      median_rel_error: its median.
      worst_case: the case label of the largest.
    """

    count: int
    max_rel_error: float
    median_rel_error: float
    worst_case: str


def error_summary(got: ArrayLike, want: ArrayLike, cases: Sequence[str]) -> ErrorSummary:
    r"""Return count, max and median of :math:`|g - w| / \max(|w|, f)`, and the worst case.

    The floor is :math:`f =` :data:`ERROR_FLOOR` :math:`\cdot\,\mathrm{mean}|w|`.

    Raises:
      ValueError: empty input, or shapes / case count that differ.

    Example:
      >>> error_summary([1.0, 2.2, 0.0], [1.0, 2.0, 0.0], ["a", "b", "c"])
      ErrorSummary(count=3, max_rel_error=0.1..., median_rel_error=0.0, worst_case='b')
    """
    g, w = np.asarray(got), np.asarray(want)
    if g.size == 0 or g.shape != w.shape or len(cases) != g.size:
        raise ValueError(
            f"got, want and cases must be non-empty and of one length, got shapes {g.shape}, "
            f"{w.shape} and {len(cases)} cases"
        )
    rel = pointwise_relative_error(g, w, floor=ERROR_FLOOR * np.mean(np.abs(w)))
    return ErrorSummary(
        count=int(g.size),
        max_rel_error=float(rel.max()),
        median_rel_error=float(np.median(rel)),
        worst_case=cases[int(np.argmax(rel))],
    )
