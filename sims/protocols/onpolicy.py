r"""On-policy preference pairs: two samples of the model itself per prompt (Razin et al. 2024 §6).

:func:`sample_two` draws two independent responses per prompt with the checkpoint's own
sampler (:func:`sims.models.sampling.sample`: key/value cache, temperature, stop at EOS or the
chat template's end of turn), in batches with progress output; :func:`pick_pairs` turns them into
chosen / rejected :class:`~sims.models.transformer.TokenBatch` es of one width by a per-pair
choice; :func:`response_texts` decodes the responses for a judge or a file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from sims.models.sampling import Samples, sample
from sims.models.transformer import TokenBatch


def _rows(batch: TokenBatch, rows: np.ndarray) -> TokenBatch:
    return TokenBatch(*(np.asarray(a)[rows] for a in batch))


def sample_batched(
    ckpt: Any,
    prompts: TokenBatch,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    log: Callable[[str], None] = print,
) -> Samples:
    """Return one sampled response per prompt, sampling ``batch_size`` prompts at a time.

    Every batch has the same shapes (the last is padded with repeats and cut), so the sampler
    compiles once; batch ``b`` draws with ``fold_in(key, b)``.
    """
    N = len(np.asarray(prompts.prompt_len))
    pad = ckpt.special_id("pad_token", ckpt.special_id("eos_token", 0))
    parts: list[Samples] = []
    for b, lo in enumerate(range(0, N, batch_size)):
        rows = np.minimum(np.arange(lo, lo + batch_size), N - 1)
        s = sample(
            ckpt.model,
            _rows(prompts, rows),
            jax.random.fold_in(key, b),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_ids=ckpt.stop_ids(),
            pad_id=pad,
        )
        keep = min(batch_size, N - lo)
        parts.append(Samples(_rows(s.batch, np.arange(keep)), s.logprob[:keep], s.stopped[:keep]))
        log(f"[sampling] {min(lo + batch_size, N)}/{N} prompts")
    return Samples(
        TokenBatch(*(np.concatenate(x) for x in zip(*(p.batch for p in parts), strict=True))),
        np.concatenate([p.logprob for p in parts]),
        np.concatenate([p.stopped for p in parts]),
    )


class TwoSamples(NamedTuple):
    """Two independent responses per prompt (``a`` drawn first)."""

    a: Samples
    b: Samples


def sample_two(ckpt: Any, prompts: TokenBatch, key: jax.Array, **kw) -> TwoSamples:
    """Return two independent on-policy samples per prompt (keys ``fold_in(key, 0 / 1)``)."""
    return TwoSamples(
        *(sample_batched(ckpt, prompts, jax.random.fold_in(key, i), **kw) for i in range(2))
    )


def response_texts(tokenizer: Any, samples: Samples, *, skip_special: bool = True) -> list[str]:
    """Return the decoded response of every row (the tokens after its prompt)."""
    b = samples.batch
    return [
        tokenizer.decode(
            np.asarray(b.tokens)[r, int(b.prompt_len[r]) : int(b.length[r])].tolist(),
            skip_special_tokens=skip_special,
        )
        for r in range(len(np.asarray(b.length)))
    ]


def pick_pairs(two: TwoSamples, chosen_is_a: np.ndarray) -> tuple[TokenBatch, TokenBatch]:
    """Return ``(chosen, rejected)`` batches: row ``i`` chosen from ``a`` where
    ``chosen_is_a[i]``, else from ``b`` (the other is rejected)."""
    m = np.asarray(chosen_is_a, bool)

    def take(first, second, mask):
        return TokenBatch(
            *(
                np.where(mask.reshape(-1, *[1] * (np.ndim(x) - 1)), x, y)
                for x, y in zip(first, second, strict=True)
            )
        )

    return take(two.a.batch, two.b.batch, m), take(two.a.batch, two.b.batch, ~m)


def distinct_responses(two: TwoSamples) -> np.ndarray:
    """``[N]`` bools: the two responses of a prompt differ (identical pairs carry no preference)."""
    a, b = two.a.batch, two.b.batch
    out = []
    for r in range(len(np.asarray(a.length))):
        ra = np.asarray(a.tokens)[r, int(a.prompt_len[r]) : int(a.length[r])]
        rb = np.asarray(b.tokens)[r, int(b.prompt_len[r]) : int(b.length[r])]
        out.append(not np.array_equal(ra, rb))
    return np.array(out, bool)


def subset(batch: TokenBatch, rows: np.ndarray) -> TokenBatch:
    """Rows ``rows`` of a batch."""
    return _rows(batch, np.asarray(rows))


def encode_instructions(ckpt: Any, texts: Sequence[str]) -> TokenBatch:
    """The instructions as right-padded prompts in the checkpoint's chat template."""
    from sims.checkpoints.tokenization import encode_prompts

    pad = ckpt.special_id("pad_token", 0)
    return encode_prompts(
        ckpt.tokenizer, list(texts), template=ckpt.template, special=ckpt.special, pad_id=pad
    )


def first_draw_pairs(
    ckpt: Any, texts: Sequence[str], key: jax.Array, **sample_kw: Any
) -> tuple[TokenBatch, TokenBatch, list[dict[str, str]]]:
    """On-policy pairs of the Figure 2 protocol: two samples per instruction, the first preferred.

    The labelling rule (fixed before any run): the two responses are i.i.d. draws, so "the first
    is preferred" orders each pair at random and independently of quality -- the Figure 2 claim
    is about similarity. Pairs with identical responses are dropped. ``sample_kw`` goes to
    :func:`sample_batched` (``temperature``, ``max_new_tokens``, ``batch_size``, ``log``).

    Returns:
      ``(chosen, rejected, rows)``: token batches of the kept pairs and their texts
      (``{"prompt", "chosen", "rejected"}``, as a TRL preference row).
    """
    two = sample_two(ckpt, encode_instructions(ckpt, texts), key, **sample_kw)
    kept = np.flatnonzero(distinct_responses(two))
    a, b = (response_texts(ckpt.tokenizer, s) for s in two)
    rows = [{"prompt": texts[i], "chosen": a[i], "rejected": b[i]} for i in kept]
    return subset(two.a.batch, kept), subset(two.b.batch, kept), rows
