r"""Synthetic multi-token preference datasets whose hidden embeddings look like real models'.

Assumptions (each mimics a property reported by Razin et al. 2024 for real models):

* **Positive inner products** between hidden embeddings of different responses ("over 99% ...
  positive for Llama-3-8B and UltraFeedback", §5): every hidden embedding has a common component
  ``mean_scale * mu`` (``mu`` a fixed unit vector) on top of a per-prompt component
  ``prompt_scale * nu_x`` and a per-prefix component.
* **Smoothness along a response**: the per-prefix component follows an AR(1) walk down the prefix
  tree, :math:`\xi_{k} = \rho\,\xi_{k-1} + \sqrt{1-\rho^2}\,\epsilon_k`, so nearby prefixes are
  more similar and a shared prefix is one node (one embedding).
* **Length effects**: response lengths are drawn independently for chosen and rejected (uniform
  on ``[min_len, max_len]`` content tokens, then an EOS token, id 0), so CHES, a sum over
  positions, correlates with the lengths as on real data (App. A, Tables 14-15).
* **A shared head in next-token distributions**: token frequencies are Zipfian and each
  unembedding has a component ``head_scale * log(freq_z / mean) * mu``, so every prefix puts
  extra mass on frequent tokens; response tokens are drawn from the same Zipf law.
* Some pairs share a response prefix (probability ``share_prob``); prompts are distinct.
* The "last hidden" embedding of a complete response (the EOS position of real models, which
  CHES drops) is one more AR(1) step; it is not a training prefix.

Nothing here is fitted to a real model; the numbers are chosen so that these properties hold.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from sims.models.prefix_tree import PrefixTreePairs, index_prefixes
from sims.models.unconstrained import UnconstrainedFeatures
from theory.checks import check_positive, check_positive_int

EOS = 0  #: token id ending every response


class SyntheticPreferences(NamedTuple):
    """A synthetic dataset: model, pairs, and the embeddings of the complete responses.

    Attributes:
      model: :class:`UnconstrainedFeatures` whose ``hidden`` rows are the dataset's prefixes.
      pairs: :class:`~sims.models.prefix_tree.PrefixTreePairs` into ``model`` (reference log-probs
      0; see
        :func:`sims.models.prefix_tree.with_reference`).
      last_hidden_chosen: ``[N, d]`` embedding of the complete chosen sequence (EOS position).
      last_hidden_rejected: ``[N, d]`` likewise.
      chosen_tokens: list of ``N`` token lists (unpadded), for edit distances.
      rejected_tokens: list of ``N`` token lists.
    """

    model: UnconstrainedFeatures
    pairs: PrefixTreePairs
    last_hidden_chosen: np.ndarray
    last_hidden_rejected: np.ndarray
    chosen_tokens: list
    rejected_tokens: list


def synthetic_preferences(
    key: jax.Array,
    *,
    num_pairs: int = 2000,
    vocab_size: int = 64,
    hidden_size: int = 16,
    min_len: int = 2,
    max_len: int = 12,
    share_prob: float = 0.2,
    mean_scale: float = 1.0,
    prompt_scale: float = 0.5,
    noise_scale: float = 0.7,
    rho: float = 0.8,
    zipf_exponent: float = 1.1,
    head_scale: float = 0.5,
    unembedding_scale: float = 1.0,
) -> SyntheticPreferences:
    r"""Return a synthetic preference dataset over the prefix tree (assumptions: module docstring).

    .. math::
       h_{x,y_{<k}} = s_\mu\,\mu + s_x\,\nu_x + s_\xi\,\xi_{x,y_{<k}},\qquad
       W_z = \frac{s_W}{\sqrt d}\,g_z + s_{\mathrm{head}}\log\frac{f_z}{\bar f}\,\mu

    Source: modelled on the embedding geometry reported in Razin et al. 2024, §5 and App. A.

    Args:
      key: typed PRNG key.
      num_pairs: ``N`` pairs, one distinct prompt each.
      vocab_size: ``V`` (token 0 is EOS).
      hidden_size: ``d``.
      min_len, max_len: content-token length range of each response (EOS added).
      share_prob: probability that the rejected response copies a prefix of the chosen one.
      mean_scale, prompt_scale, noise_scale: :math:`s_\mu, s_x, s_\xi`.
      rho: AR(1) correlation of consecutive prefixes, in ``[0, 1)``.
      zipf_exponent: token frequencies :math:`f_z\propto z^{-a}` (``z >= 1``).
      head_scale: :math:`s_{\mathrm{head}}`.
      unembedding_scale: :math:`s_W`.

    Returns:
      :class:`SyntheticPreferences`.

    Raises:
      ValueError: non-positive sizes or scales, ``min_len > max_len``, ``rho`` outside [0, 1),
        ``share_prob`` outside [0, 1].

    Example:
      >>> data = synthetic_preferences(jax.random.key(0), num_pairs=3, vocab_size=8, hidden_size=4)
      >>> data.pairs.chosen.shape[0], data.model.hidden.shape[1]
      (3, 4)
    """
    for name, value in (
        ("num_pairs", num_pairs),
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("min_len", min_len),
        ("max_len", max_len),
    ):
        check_positive_int(name, value)
    for name, value in (
        ("mean_scale", mean_scale),
        ("noise_scale", noise_scale),
        ("zipf_exponent", zipf_exponent),
        ("unembedding_scale", unembedding_scale),
    ):
        check_positive(name, value)
    if min_len > max_len:
        raise ValueError(f"min_len must be <= max_len, got min_len={min_len}, max_len={max_len}")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got rho={rho}")
    if not 0.0 <= share_prob <= 1.0:
        raise ValueError(f"share_prob must be in [0, 1], got share_prob={share_prob}")
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (EOS and two content tokens), got {vocab_size}")
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)  # host-side draws (tree building is sequential)
    d, V = hidden_size, vocab_size
    mu = rng.normal(size=d)
    mu /= np.linalg.norm(mu)
    freq = np.arange(1, V) ** -zipf_exponent
    freq /= freq.sum()
    chosen, rejected = [], []
    for _ in range(num_pairs):
        lc, lr = rng.integers(min_len, max_len + 1, 2)
        c = list(1 + rng.choice(V - 1, lc, p=freq))
        r = list(1 + rng.choice(V - 1, lr, p=freq))
        if rng.random() < share_prob and min(lc, lr) > 1:
            s = int(rng.integers(1, min(lc, lr)))
            r[:s] = c[:s]
        if r == c:  # keep responses distinct
            r[-1] = 1 + (r[-1] % (V - 1))
        chosen.append(c + [EOS])
        rejected.append(r + [EOS])
    pairs, prefixes = index_prefixes(list(range(num_pairs)), chosen, rejected)
    prompt_dir = rng.normal(size=(num_pairs, d)) / np.sqrt(d)
    # AR(1) down the tree: ids follow first appearance, so a parent's id is below its child's.
    row = {p: i for i, p in enumerate(prefixes)}
    ends = [(i, tuple(y)) for i, y in enumerate(chosen)] + [
        (i, tuple(y)) for i, y in enumerate(rejected)
    ]
    nodes = prefixes + ends  # the complete responses (EOS positions) come last
    eps = rng.normal(size=(len(nodes), d)) / np.sqrt(d)
    xi = np.empty_like(eps)
    for i, (x, toks) in enumerate(nodes):
        xi[i] = eps[i] if not toks else rho * xi[row[(x, toks[:-1])]] + np.sqrt(1 - rho**2) * eps[i]
    prompts = np.array([x for x, _ in nodes])
    emb = mean_scale * mu[None, :] + prompt_scale * prompt_dir[prompts] + noise_scale * xi
    hidden = emb[: len(prefixes)]
    last_c = emb[len(prefixes) : len(prefixes) + num_pairs]
    last_r = emb[len(prefixes) + num_pairs :]
    head = np.concatenate([[np.log(freq.max() / freq.mean())], np.log(freq / freq.mean())])
    W = unembedding_scale * rng.normal(size=(V, d)) / np.sqrt(d) + head_scale * head[:, None] * mu
    model = UnconstrainedFeatures.from_arrays(W, hidden)
    return SyntheticPreferences(model, pairs, last_c, last_r, chosen, rejected)
