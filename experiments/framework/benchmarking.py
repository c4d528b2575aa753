"""Timing harness of the real-model DPO step: JAX (this project) against PyTorch + transformers.

Both sides run the same step on the same weights (the same GGUF file; transformers reads it with
``gguf_file=``), the same shapes (``B`` pairs of two ``T``-token sequences, the response the second
half), float32, DPO (beta 0.1) with torch RMSprop (lr 1e-7, alpha 0.99, eps 1e-8): forward of the
chosen and rejected sequences, summed response log-probs, the DPO loss against fixed reference
log-probs, backward, optimiser step.

* JAX: the project's :func:`sims.flows.core.preference_flow` (the prepared :class:`Flow`, chunks of
  a fixed compiled length, donated carry). The first call is ``Flow.run()`` of one step from a cold
  cache (trace + compile + run); the steady step time is the difference of two runs of ``n1`` and
  ``n2`` steps divided by ``n2 - n1`` (the fixed per-run cost -- parameter copy, first forward
  pass -- cancels). Memory: XLA's memory analysis of the compiled chunk against a floor of
  parameters + gradients + RMSprop state.
* PyTorch: an eager loop, ``torch.optim.RMSprop``; the first call includes nothing compiled.

Both sides are prepared first (their first calls timed), then timed in ``repeats`` interleaved
rounds (:func:`compare_steps`): wall clock, the fastest round per side; the machine's load
average is recorded beside them.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BETA, LR = 0.1, 1e-7  # the paper's DPO settings (App. H)


def torch_available() -> bool:
    """Whether PyTorch is installed (the optional ``bench`` extra)."""
    return importlib.util.find_spec("torch") is not None


def best_time(fn: Callable[[], object], *, repeats: int) -> float:
    """Return the minimum wall time (s) of ``repeats`` calls of ``fn`` (which must block)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_wall_and_cpu(fn: Callable[[], object], *, repeats: int) -> tuple[float, float]:
    """Return the minimum wall time and the minimum CPU time (s) of ``repeats`` calls of ``fn``.

    CPU time is this process's (all threads, ``time.process_time``): on a machine shared with
    other jobs it counts only the time the work held a core, so rates per CPU-second vary far
    less with the load than wall-clock rates.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, start = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def boxed_steps(seconds_per_step: float, budget_s: float, min_steps: int, max_steps: int) -> int:
    """Steps of a time-boxed call: ``budget_s`` over the step time, clipped to the bounds."""
    return int(np.clip(budget_s / max(seconds_per_step, 1e-9), min_steps, max_steps))


def random_pairs(vocab: int, B: int, T: int, seed: int):
    """``(chosen, rejected)`` token batches ``[B, T]``: a shared random prompt of ``T // 2``
    tokens, then different random responses."""
    from sims.models.transformer import TokenBatch

    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, (B, T // 2))
    out = []
    for _ in range(2):
        tokens = np.concatenate([prompt, rng.integers(0, vocab, (B, T - T // 2))], 1)
        plen = np.full(B, T // 2, np.int32)
        out.append(TokenBatch(tokens.astype(np.int32), plen, np.full(B, T, np.int32)))
    return out


def _observe_nothing(model, pairs) -> jax.Array:
    return jnp.zeros(())


class Side(NamedTuple):
    """One side of the comparison, prepared: its first call already made and timed.

    ``runs`` maps a step count to a blocking call running that many steps; ``info`` holds what
    the result reports besides times (reference log-probs, memory, versions).
    """

    first_call_s: float
    runs: dict[int, Callable[[], object]]
    info: dict


def bench_pairs(model, B: int, T: int, *, packed: bool = True):
    """The JAX side's :func:`random_pairs` with their reference log-probs (built once per shape).

    ``packed``: the pairs' layout (:class:`sims.models.transformer.PackedPairs`: the shared
    prompt once, logits at response positions only; ``False``: two plain batches).
    """
    from sims.models.transformer import make_transformer_pairs

    chosen, rejected = random_pairs(model.vocab_size, B, T, 0)
    return make_transformer_pairs(model, chosen, rejected, chunk_size=1, packed=packed)


def jax_side(model, pairs, *, n1: int, n2: int) -> Side:
    """Prepare the JAX DPO step on :func:`bench_pairs` (see the module docstring): runs of
    ``n1`` and ``n2`` steps."""
    from sims.flows.core import preference_flow
    from theory.losses import make_loss

    loss = make_loss("dpo", beta=BETA)

    def flow(n):
        return preference_flow(
            model,
            pairs,
            loss,
            dt=LR,
            num_steps=n,
            record_every=n,
            optimizer="rmsprop_torch",
            observe=_observe_nothing,
            record_loss=False,
        )

    start = time.perf_counter()
    jax.block_until_ready(flow(1).run().first_nonfinite_step)
    first = time.perf_counter() - start
    refs = np.concatenate([pairs.ref_logprob_chosen, pairs.ref_logprob_rejected]).tolist()
    info = {"ref_logprobs": refs, "memory": flow(n2).memory()._asdict()}
    return Side(first, {n: (lambda n=n: flow(n).run()) for n in (n1, n2)}, info)


def torch_side(gguf_path: str, B: int, T: int, *, n: int, threads: int = 0) -> Side:
    """Prepare the PyTorch + transformers eager DPO step on the same GGUF file and shapes.

    ``n``: steps per timed run; ``threads``: torch's intra-op threads (0: one per core).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    path = os.fspath(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).train()
    opt = torch.optim.RMSprop(model.parameters(), lr=LR, alpha=0.99, eps=1e-8)
    chosen, rejected = random_pairs(model.config.vocab_size, B, T, 0)

    def logps(batch):
        ids = torch.as_tensor(batch.tokens, dtype=torch.long)
        logits = model(ids).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        mask = torch.arange(1, T)[None, :] >= torch.as_tensor(batch.prompt_len)[:, None]
        return (lp * mask).sum(-1)

    with torch.no_grad():
        ref_c, ref_r = logps(chosen), logps(rejected)

    def step():
        opt.zero_grad(set_to_none=True)
        margin = (logps(chosen) - ref_c) - (logps(rejected) - ref_r)
        loss = -torch.nn.functional.logsigmoid(BETA * margin).mean()
        loss.backward()
        opt.step()

    def run():
        for _ in range(n):
            step()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ref_logprobs": torch.cat([ref_c, ref_r]).tolist(),
    }
    return Side(first, {n: run}, info)


def compare_steps(
    jax_prepared: Side, torch_prepared: Side | None, *, repeats: int
) -> tuple[dict, dict | None]:
    """Time both sides interleaved, ``repeats`` rounds of (JAX's two runs, PyTorch's run).

    On a shared host the machine's speed drifts by tens of percent over minutes (measured: the
    matrix-product peak of this 2-core machine read 299 and 148 GFLOP/s in two runs an hour
    apart), so each round times both sides at nearly the same moment; the fastest round counts
    on each side. JAX's step is the difference of its two runs in a round over the difference
    of their step counts (the fixed per-run cost cancels); ``step_upper_bound_s`` is its longer
    run over its steps (fixed cost included). PyTorch's step is its run over its step count.
    Every round's times are returned (``rounds``).
    """
    (n1, run1), (n2, run2) = sorted(jax_prepared.runs.items())
    if torch_prepared is not None:
        ((n_torch, run_torch),) = torch_prepared.runs.items()
    rounds = []
    for _ in range(repeats):
        r = {"jax_n1_s": best_time(run1, repeats=1), "jax_n2_s": best_time(run2, repeats=1)}
        if torch_prepared is not None:
            r["torch_step_s"] = best_time(run_torch, repeats=1) / n_torch
        rounds.append(r)
    # the step within each round (its two runs seconds apart), the fastest round counting
    step = min((r["jax_n2_s"] - r["jax_n1_s"]) / (n2 - n1) for r in rounds)
    bound = min(r["jax_n2_s"] for r in rounds) / n2  # the whole run per step: an upper bound
    method = "difference of two runs in one round"
    if step <= 0:  # noise above the step's cost (tiny models): the whole run bounds it
        step, method = bound, "upper bound (run time / steps; the difference was not > 0)"
    jx = {"first_call_s": jax_prepared.first_call_s, "step_s": step, "steps_per_s": 1 / step}
    jx |= {"step_upper_bound_s": bound, "step_method": method, "rounds": rounds}
    jx |= {"timing": "interleaved with PyTorch", "n1": n1, "n2": n2} | jax_prepared.info
    if torch_prepared is None:
        return jx, None
    torch_step = min(r["torch_step_s"] for r in rounds)
    tx = {"first_call_s": torch_prepared.first_call_s, "step_s": torch_step}
    return jx, tx | {"steps_per_s": 1 / torch_step} | torch_prepared.info


def step_flops(config, vocab_size: int, B: int, T: int, *, packed: bool = True) -> float:
    """Matrix-product flops of one DPO step of a :class:`sims.models.decoder.DecoderLM`.

    Forward: every layer's linear maps (``2 * rows * parameters``) and its dense attention
    (``4 * heads * head_dim * L**2`` per row of ``L`` tokens, as computed: masked entries too),
    the vocabulary head at the positions that need logits (``2 * d * V`` each); the backward is
    twice the forward; RMSprop ~10 flops per parameter. Plain layout: ``2B`` rows of ``T - 1``
    tokens, logits at all of them; packed (:func:`random_pairs`: responses of
    ``R = T - T // 2``): ``B`` rows of ``T + R``, logits at ``2R`` per pair.
    """
    c = config
    attn = c.num_heads * c.head_dim
    per_layer = 2 * c.hidden_size * attn + 2 * c.hidden_size * c.num_kv_heads * c.head_dim
    per_layer += 3 * c.hidden_size * c.intermediate_size
    R = T - T // 2
    rows, L, head = (B, T + R, 2 * B * R) if packed else (2 * B, T - 1, 2 * B * (T - 1))
    layer = 2 * rows * L * per_layer + 4 * attn * rows * L * L
    forward = c.num_layers * layer + 2 * c.hidden_size * vocab_size * head
    n_params = c.num_layers * per_layer + vocab_size * c.hidden_size * (1 if c.tied else 2)
    return float(3 * forward + 10 * n_params)


def step_cost(model, pairs) -> dict:
    """The flops of one DPO step on :func:`bench_pairs` (:func:`step_flops`) and XLA's own
    ``cost_analysis``.

    XLA counts a ``while`` loop's body once, so for the layers scanned in
    :class:`sims.models.decoder.DecoderLM` its ``flops`` / ``bytes`` cover one layer (plus the
    head); they are kept under ``xla_cost_analysis`` for reference. The roofline position of a
    step is ``flops / step_s``.
    """
    from sims.flows.core import pair_logprobs
    from theory.losses import make_loss, mean_pair_loss

    B, T = pairs.chosen.tokens.shape
    packed = pairs.packed is not None
    loss = make_loss("dpo", beta=BETA)
    graphdef, params = nnx.split(model)

    def objective(params):
        lp_c, lp_r = pair_logprobs(nnx.merge(graphdef, params), pairs)
        ref_c, ref_r = pairs.ref_logprob_chosen, pairs.ref_logprob_rejected
        return mean_pair_loss(loss, lp_c, lp_r, ref_c, ref_r)

    cost = jax.jit(jax.grad(objective)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "flops": step_flops(model.config, model.vocab_size, B, T, packed=packed),
        "xla_cost_analysis": {
            "flops": float(cost["flops"]),
            "bytes": float(cost["bytes accessed"]),
            "note": "the scanned layers' loop body counted once",
        },
    }


def memory_floor(model, B: int, T: int, *, packed: bool = True) -> dict:
    """The least memory a DPO step can hold, in bytes (float32).

    ``state``: parameters + gradients + RMSprop's second moment (3 copies of the parameters);
    ``activations``: what a fully rematerialised backward must keep -- one residual stream per
    layer -- plus one logits tensor: ``[2B, T, d]`` and ``[2B, T, V]`` in the plain layout;
    packed (:func:`random_pairs`' prompt of ``T // 2``, responses of ``R = T - T // 2``),
    ``[B, T + R, d]`` and ``[2B, R, V]``.
    """
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    params = sum(x.size * x.dtype.itemsize for x in leaves)
    c = model.config
    R = T - T // 2
    rows, head = (B * (T + R), 2 * B * R) if packed else (2 * B * T, 2 * B * T)
    acts = 4 * (rows * c.hidden_size * c.num_layers + head * model.vocab_size)
    return {"state": 3 * params, "activations": acts, "total": 3 * params + acts}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (timings on a shared machine are read beside them)."""
    return [float(x) for x in os.getloadavg()]
