"""Model graphs from specs: the training step, the evaluation step, inference."""
from __future__ import annotations

import numpy as np

from gptc.compiler import dsl
from gptc.compiler.ir import Graph, Tensor
from gptc.models.gpt import decode_attend, gpt_logits, prefill_attend
from gptc.models.sampling import add_sampling
from gptc.compiler.optim import add_training
from gptc.compiler.precision import apply_precision
from gptc.compiler.parallel import SINGLE, Parallel
from gptc.spec import Spec, SpecError, validate

MODES = ("train", "eval", "infer", "prefill", "decode")


def build_graph(spec: Spec, mode: str = "train", batch: int | None = None, seq_len: int | None = None,
                expose_gradients: bool = False, sink: int = 0, sample: bool = False,
                parallel: Parallel = SINGLE) -> Graph:
    """The graph of one step of `mode` for the GPT of `spec`:
    train: inputs tokens, targets (B, S) i32, lr, step -> loss, grad_norm; updates params and moments
           (step also keys the dropout masks);
    eval:  inputs tokens, targets -> loss;
    (train and eval of a mixture-of-experts model also output aux_loss, the
    load-balancing loss; training minimizes loss + model.moe_aux_weight * aux_loss);
    infer: input tokens -> logits (B, S, V);
    prefill: inputs tokens (B, L) (padded; L = seq_len, default the context S, see
             prefill_lengths) and last (B,) i32, the flat index b*L + (length-1) of each
             sequence's last token -> logits (B, V); updates the KV cache states
             k_cache.<l>, v_cache.<l> (B, H, S, head_dim), rows 0..L-1 (the others zero)
             (linear attention: its state kv_state.<l> (B, kv_heads, head_dim, head_dim + 1));
    decode: inputs tokens (B, 1) and pos (B,) i32, sequence b's new token at position
             pos[b] -> logits (B, V); writes the new keys and values into the KV cache at
             pos[b] only and attends over positions 0..pos[b] (linear attention: adds to
             its state);
    with `sink` > 0, prefill and decode keep a StreamingLLM-style cache (gptc generate
    --past-context stream): the first `sink` slots and a ring over the others; decode
    then also takes slot (B,) i32, where the new key and value go, and pos is the
    position within the cache (seq_len - 1 once the ring is full).
    sample=True (prefill and decode, as bundles build them): the graph ends with the
    sampling tail (gptc/models/sampling.py): output next_token (B,) i32, drawn from
    the logits on the device with run-time sampling settings.
    `parallel`: train only, the rank of a data-parallel world this graph runs on
    (compiler/parallel.py); `batch` is then the batch of one rank."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    validate(spec)
    g = _model_graph(spec, mode, batch, seq_len, expose_gradients, sink, sample, parallel)
    if spec.train.precision != "fp32":
        # After the optimizer (DESIGN's order); fp32 graphs stay exactly as built.
        apply_precision(g, spec.train.precision)
        g.prune()  # the f32 views the casts replaced
    return g


def _model_graph(spec: Spec, mode: str, batch: int | None, seq_len: int | None, expose_gradients: bool,
                 sink: int = 0, sample: bool = False, parallel: Parallel = SINGLE) -> Graph:
    batch = batch or spec.train.batch_size
    seq = seq_len or spec.model.seq_len
    if batch <= 0 or seq <= 0:
        raise SpecError("batch size and sequence length must be positive")
    if sink:
        check_sink(spec, sink)
        if mode not in ("prefill", "decode"):
            raise ValueError(f"only the prefill and decode steps keep a streaming cache, not {mode}")
    g = Graph()
    if mode == "prefill":
        if sink and seq != spec.model.seq_len:
            raise ValueError("the prefill of a streaming cache takes the whole context")
        tokens = g.input("tokens", (batch, seq), "i32", bound=spec.model.vocab_size)
        last = g.input("last", (batch,), "i32", bound=batch * seq)
        g.output("logits", gpt_logits(g, spec.model, tokens, prefill_attend(g, spec.model, last, sink), rows=last))
        if sample:
            add_sampling(g, Tensor(g, g.outputs["logits"]))
        return g
    if mode == "decode":
        tokens = g.input("tokens", (batch, 1), "i32", bound=spec.model.vocab_size)
        pos = g.input("pos", (batch,), "i32", bound=spec.model.seq_len)
        slot = g.input("slot", (batch,), "i32", bound=spec.model.seq_len) if sink else None
        logits = gpt_logits(g, spec.model, tokens, decode_attend(g, spec.model, pos, slot, sink),
                            positions=pos.reshape(batch, 1))
        g.output("logits", logits.reshape(batch, spec.model.vocab_size))
        if sample:
            add_sampling(g, Tensor(g, g.outputs["logits"]))
        return g
    tokens = g.input("tokens", (batch, seq), "i32", bound=spec.model.vocab_size)
    aux_losses: list = []
    logits = gpt_logits(g, spec.model, tokens, training=mode == "train", aux_losses=aux_losses,
                        seed=spec.train.seed)
    if mode == "infer":
        g.output("logits", logits)
        return g
    loss = dsl.cross_entropy(logits, g.input("targets", (batch, seq), "i32", bound=spec.model.vocab_size))
    objective = loss
    if aux_losses:
        # Mixture of experts: the load-balancing losses, averaged over the layers, are
        # reported as "aux_loss" and added to the objective with their weight ("loss"
        # stays the cross-entropy, comparable across specs).
        with g.scope("aux_loss"):
            aux = sum(aux_losses[1:], aux_losses[0]) * (1.0 / len(aux_losses))
            g.output("aux_loss", aux)
            objective = loss + aux * spec.model.moe_aux_weight
    if mode == "eval":
        g.output("loss", loss)
    else:
        add_training(g, loss, spec.train, expose_gradients, objective=objective, parallel=parallel)
    g.prune()
    return g


PREFILL_MIN_LENGTH = 8


def prefill_lengths(spec: Spec, sink: int = 0) -> list[int]:
    """The lengths of the prefill steps a model gets, longest first: the context S, then
    S/4 and S/16 (those of at least PREFILL_MIN_LENGTH tokens), so that a prompt is
    prefilled at the shortest length that holds it (at most 4 times its length, or the
    shortest step) rather than at the whole context (the cost grows with the length, attention's with its
    square). Each length is a plan of its own, a dozen more kernels to compile. A
    streaming cache (`sink`) takes the whole context only."""
    s = spec.model.seq_len
    if sink:
        return [s]
    return [s] + [s // d for d in (4, 16) if s % d == 0 and s // d >= PREFILL_MIN_LENGTH]


def check_sink(spec: Spec, sink: int) -> None:
    """Refuse a streaming cache (build_graph's sink) that the model cannot keep."""
    if not 0 < sink < spec.model.seq_len - 1:
        raise SpecError(f"a streaming cache keeps 1 to {spec.model.seq_len - 2} first tokens of the prefill "
                        f"and decode steps, got {sink}")
    if spec.model.attention == "linear":
        raise SpecError("linear attention keeps a state, not a cache: it has no streaming cache")


def init_params(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    """Initial float32 values of every parameter, from the `init` attribute each
    parameter was declared with. Same seed, same values."""
    rng = np.random.default_rng(seed)
    values = {}
    for name in sorted(graph.params):
        attrs = graph.node(graph.params[name])["attrs"]
        shape = attrs["shape"]
        if attrs["init"] == "normal":
            values[name] = (rng.standard_normal(shape) * attrs["std"]).astype(np.float32)
        elif attrs["init"] == "constant":
            values[name] = np.full(shape, attrs["value"], dtype=np.float32)
        else:
            values[name] = (np.ones if attrs["init"] == "ones" else np.zeros)(shape, dtype=np.float32)
    return values


def param_count(spec: Spec) -> int:
    g = build_graph(spec, "infer", batch=1)
    return sum(g.type(n).size for n in g.params.values())
