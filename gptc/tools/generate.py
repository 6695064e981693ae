"""Sampling: prefill, then one KV-cache decode step per new token.

The model conditions each new token on the last `seq_len` tokens (positions from 0).
While the text fits the context, each token costs one decode step that reads and
extends the KV cache (on a GPU, up to CHAIN_STEPS of them queued at once, each drawn
token fed to the next step on the device, so the host reads token ids back once a
chain); once it no longer fits, the window slides, every position
changes, and each token costs a prefill of the last `seq_len` tokens. Either way the
result equals recomputing the whole window for every token (tests check it). Several
sequences of any lengths decode together (a ragged batch, each at its own position);
with a streaming cache (--past-context stream) decoding goes on past the context with
the first tokens and the most recent ones (StreamingLLM-style)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from gptc.models import build_graph, check_sink, prefill_lengths
from gptc.models.sampling import SEEN, sampling_feeds, seen_rows
from gptc.spec import GptcError, Spec


# Decode steps a GPU model queues at once while the sequences fit the context: one device
# graph and one read-back of their token ids, each drawn token fed to the next step on the
# device (at batch 1 on a small model, the host round trip costs as much as the step).
# The CPU reference has no round trip to save: it decodes, and streams, token by token.
CHAIN_STEPS = 16


@dataclass(frozen=True)
class SamplingParams:
    num_tokens: int = 50
    temperature: float = 1.0
    top_k: int = 50              # 0: no top-k cut
    top_p: float = 1.0           # nucleus: keep the smallest set of tokens with this much probability
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int | None = None

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Refuse out-of-range values in one line; top-k is checked against `vocab_size`
        when given (the tokenizer's, once a checkpoint is loaded)."""
        if self.num_tokens < 1:
            raise GptcError(f"--num-tokens must be at least 1, got {self.num_tokens}")
        if not self.temperature > 0:
            raise GptcError(f"--temp must be greater than 0, got {self.temperature} (use --greedy for argmax)")
        if self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
            raise GptcError(f"--top-k must be between 0 (off) and the vocabulary size"
                            f"{f' {vocab_size}' if vocab_size is not None else ''}, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GptcError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise GptcError(f"--repetition-penalty must be greater than 0, got {self.repetition_penalty}")
        if self.seed is not None and self.seed < 0:
            raise GptcError(f"--seed must be 0 or more, got {self.seed}")
        return self


def check_prompt(prompt: str) -> None:
    if not prompt:
        raise GptcError("the prompt is empty; give at least one character with --prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 on the command line arrive as surrogates
        raise GptcError(f"the prompt is not valid UTF-8 (character {e.start + 1}); give it as UTF-8 text") from None


def choose(logits: np.ndarray, history: Sequence[int], p: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits, on the host: the definition of the
    sampling options. Generation draws on the device instead, with these semantics
    (gptc/compiler/ops/sample.py; tests compare the two)."""
    z = np.asarray(logits, dtype=np.float64).copy()
    if p.repetition_penalty != 1.0 and len(history):
        seen = np.unique(np.asarray(history))
        # As in CTRL / Hugging Face: shrink positive logits, grow negative ones.
        z[seen] = np.where(z[seen] > 0, z[seen] / p.repetition_penalty, z[seen] * p.repetition_penalty)
    if p.greedy:
        return int(np.argmax(z))
    z /= p.temperature
    if p.top_k:
        cut = np.partition(z, -p.top_k)[-p.top_k]
        z[z < cut] = -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < p.top_p  # always keeps the top token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


class Model:
    """Prefill and decode steps of one model on one executor kind, sharing the KV cache
    and the sampling state, for up to `batch` sequences at a time (the steps' batch).
    `prefill` maps lengths to prefill steps (gptc.models.prefill_lengths): sequences are
    prefilled by the shortest that holds the longest of them.
    Fewer sequences fill the other rows with a one-token dummy, whose tokens are
    dropped. `sink` > 0: the steps keep a StreamingLLM-style cache (build_graph's sink)
    and decode takes slots. Each step ends with the sampling tail of the graphs
    (gptc/models/sampling.py): it draws every sequence's next token itself, and only
    the token ids are read back (`fetch`, by prefill; None reads every output, as the
    CPU reference does; decode reads next_token only). Up to `chain_steps` decode steps
    are queued at once (decode())."""

    def __init__(self, spec: Spec, prefill: Mapping[int, object], decode, share_cache: Callable[[], None],
                 batch: int = 1, sink: int = 0, fetch: Sequence[str] | None = None, chain_steps: int = 1) -> None:
        self.prefill_steps = dict(sorted(prefill.items()))
        self.prefill_step = self.prefill_steps[max(self.prefill_steps)]  # the whole context's
        self.spec, self.decode_step, self.share_cache = spec, decode, share_cache
        self.batch, self.sink, self.fetch, self.chain_steps = batch, sink, fetch, chain_steps
        self.sampling: dict[str, np.ndarray] = {}

    def _rows(self, n: int) -> None:
        if not 1 <= n <= self.batch:
            raise ValueError(f"{n} sequences for a model of batch {self.batch}")

    def start(self, histories: Sequence[Sequence[int]], p: SamplingParams, vocab_limit: int,
              sequences: Sequence[int] | None = None) -> None:
        """Before a generation: the sampling settings, each sequence's id (the draws'
        key with the seed: default 0, 1, ...) and the tokens each has seen so far (the
        repetition penalty's history) written into the sampling state."""
        self._rows(len(histories))
        ids = np.zeros(self.batch, np.int32)
        ids[:len(histories)] = range(len(histories)) if sequences is None else sequences
        self.sampling = sampling_feeds(p, vocab_limit, np.zeros(self.batch, np.int32), ids)
        dummies = [[]] * (self.batch - len(histories))
        self.decode_step.write({SEEN: seen_rows([*histories, *dummies], self.spec.model.vocab_size)})

    def _run(self, step, feeds: dict, n: int, index: int | Sequence[int]) -> np.ndarray:
        indices = np.zeros(self.batch, np.int32)
        indices[:n] = index
        feeds = {**feeds, **self.sampling, "sample_index": indices}
        out = step.run(feeds) if self.fetch is None else step.run(feeds, outputs=self.fetch)
        return np.asarray(out["next_token"][:n])

    def prefill(self, sequences: Sequence[Sequence[int]], index: int | Sequence[int]) -> np.ndarray:
        """The tokens (len(sequences),) drawn after each sequence (at most seq_len tokens
        each, of any lengths: right-padded), token `index` of each one's generation;
        fills each one's cache rows."""
        self._rows(len(sequences))
        longest = max(len(tokens) for tokens in sequences)
        s, step = next((n, step) for n, step in self.prefill_steps.items() if n >= longest)
        padded = np.zeros((self.batch, s), np.int32)
        last = np.arange(self.batch, dtype=np.int32) * s  # the dummy rows: one token
        for b, tokens in enumerate(sequences):
            padded[b, :len(tokens)] = tokens
            last[b] += len(tokens) - 1
        drawn = self._run(step, {"tokens": padded, "last": last}, len(sequences), index)
        self.share_cache()
        return drawn

    def decode(self, tokens: Sequence[int], positions: Sequence[Sequence[int]], index: int,
               slots: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """The tokens (len(positions), len(tokens)) drawn by len(positions) decode steps
        queued at once: step j appends, at position positions[j][b] of sequence b (its
        cache holds 0..positions[j][b]-1), tokens[b] (step 0) or the token step j-1 drew
        (fed back on the device), as token index + j of each generation; with a
        streaming cache, its key and value go to cache slot slots[j][b]."""
        n, steps = len(tokens), len(positions)
        self._rows(n)
        feeds = {name: np.broadcast_to(value, (steps, *np.shape(value))) for name, value in self.sampling.items()}
        feeds["tokens"] = np.zeros((steps, self.batch, 1), np.int32)
        feeds["tokens"][0, :n, 0] = tokens
        feeds["pos"] = np.zeros((steps, self.batch), np.int32)
        feeds["pos"][:, :n] = positions
        feeds["sample_index"] = np.zeros((steps, self.batch), np.int32)
        feeds["sample_index"][:, :n] = index + np.arange(steps)[:, None]
        if self.sink:
            feeds["slot"] = np.zeros((steps, self.batch), np.int32)
            feeds["slot"][:, :n] = slots
        return np.asarray(self.decode_step.run_chain(feeds, {"tokens": "next_token"}, ("next_token",))["next_token"])[:, :n]

    def full(self, sequences: Sequence[Sequence[int]], index: int | Sequence[int]) -> np.ndarray:
        """The tokens drawn recomputing each whole window (no cache reuse)."""
        return self.prefill([list(t)[-self.spec.model.seq_len:] for t in sequences], index)


def cpu_model(spec: Spec, params: Mapping[str, np.ndarray], batch: int = 1, sink: int = 0) -> Model:
    """The reference executors of prefill and decode hold their params and states in one
    dict, as the GPU steps share one persistent arena: the KV cache and the sampling
    state written by one step are read by the other."""
    from gptc.runtime.reference import ReferenceExecutor
    prefill = {n: ReferenceExecutor(build_graph(spec, "prefill", batch, n, sink=sink, sample=True), params)
               for n in prefill_lengths(spec, sink)}
    decode = ReferenceExecutor(build_graph(spec, "decode", batch, sink=sink, sample=True), params)
    for step in prefill.values():
        decode.persistent |= step.persistent
    for step in prefill.values():
        step.persistent = decode.persistent
    return Model(spec, prefill, decode, lambda: None, batch, sink)


def gpu_model(runtime) -> Model:
    """From a gptc.runtime.bundle.BundleRuntime: prefill and decode share device memory."""
    table = runtime.steps["decode"].table
    batch = table["buffers"][table["inputs"]["pos"]]["shape"][0]
    from gptc.runtime.bundle import prefill_steps
    prefill = {length: runtime.steps[step] for length, step in prefill_steps(runtime.bundle.spec, runtime.steps)}
    return Model(runtime.bundle.spec, prefill, runtime.steps["decode"], lambda: None, batch,
                 runtime.bundle.manifest.get("sink", 0), fetch=("next_token",), chain_steps=CHAIN_STEPS)


def generate_batch(model: Model, prompts: Sequence[Sequence[int]], p: SamplingParams, use_cache: bool = True,
                   vocab_size: int | None = None, sequences: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Yield, `p.num_tokens` times, the next token of every prompt (ragged lengths
    decode together, each sequence at its own position), all below `vocab_size`
    (default: the model's): a model may have more embedding rows than its tokenizer has
    tokens, and the rows past the tokenizer's are never sampled. Token i of sequence b
    is drawn on the device by the step that computes its logits, from Philox keyed by
    (seed, i, sequences[b]) (default ids 0, 1, ...): the same seed and id give the same
    tokens on the CPU reference and the GPU, with or without the cache, in any row of
    any batch. While every sequence fits the context, a token costs one decode step
    (chains of up to model.chain_steps steps queued at once, their tokens yielded as
    each chain ends); once one no longer fits, its window slides, every position of it
    changes, and each step costs a prefill of every sequence's last seq_len tokens
    (exact: tests check it). A model with a streaming cache (model.sink > 0) decodes on
    in chains instead: each new token goes to the ring slot of the oldest token after
    the sinks, at position seq_len - 1 within the cache."""
    s = model.spec.model.seq_len
    n = model.spec.model.vocab_size if vocab_size is None else vocab_size
    tokens = [list(prompt) for prompt in prompts]
    if p.num_tokens < 1:
        return
    if not tokens or not all(tokens):
        raise GptcError("the prompt is empty; give at least one character")
    model.start(tokens, p, n, sequences)
    drawn = [model.prefill([t[-s:] for t in tokens], 0) if use_cache else model.full(tokens, 0)]
    cached = [min(len(t), s) for t in tokens]  # tokens each cache has taken, prefill included
    index = 0
    while True:
        for row in drawn:
            new = [int(token) for token in row]
            for t, token in zip(tokens, new):
                t.append(token)
            yield new
            index += 1
            if index == p.num_tokens:
                return
        if not use_cache:
            drawn = [model.full(tokens, index)]
        elif model.sink:  # the n-th token of a cache goes to slot n, then round the ring after the sinks
            steps = range(chain_length(p.num_tokens - index, model.chain_steps))
            slots = [[c + j if c + j < s else model.sink + (c + j - model.sink) % (s - model.sink) for c in cached]
                     for j in steps]
            drawn = model.decode(new, [[min(c + j, s - 1) for c in cached] for j in steps], index, slots)
            cached = [c + len(steps) for c in cached]
        elif all(len(t) <= s for t in tokens):  # step j writes position len(t) - 1 + j: at most s - 1
            room = s + 1 - max(len(t) for t in tokens)
            steps = range(chain_length(min(p.num_tokens - index, room), model.chain_steps))
            drawn = model.decode(new, [[len(t) - 1 + j for t in tokens] for j in steps], index)
        else:  # a window slid: every position of that sequence changed
            drawn = [model.prefill([t[-s:] for t in tokens], index)]


def chain_length(limit: int, most: int = CHAIN_STEPS) -> int:
    """Decode steps to queue at once: the largest power of two up to `limit` and `most`
    (a few lengths, so a few device graphs)."""
    if limit < 1 or most < 1:
        raise ValueError(f"a chain of at most {limit} and {most} steps")
    return 1 << (min(limit, most).bit_length() - 1)


def generate_tokens(model: Model, prompt: Sequence[int], p: SamplingParams, use_cache: bool = True,
                    vocab_size: int | None = None) -> Iterator[int]:
    """Yield `p.num_tokens` new tokens after one `prompt` (at least one token)."""
    for new in generate_batch(model, [prompt], p, use_cache, vocab_size):
        yield new[0]


def read_prompt_file(path: str) -> list[str]:
    """The prompts of a --prompt-file: one per line (blank lines skipped), UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise GptcError(f"cannot read the prompt file '{path}': {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GptcError(f"the prompt file '{path}' is not UTF-8 text (byte {e.start + 1})") from None
    prompts = [line for line in prompts if line.strip()]
    if not prompts:
        raise GptcError(f"the prompt file '{path}' has no prompt; give one per line")
    return prompts


def run_generate(checkpoint: str, prompt: str, p: SamplingParams, device_name: str = "auto",
                 out=None, log: Callable[[str], None] | None = None) -> str:
    """`gptc generate --prompt`: load a checkpoint, encode the prompt, stream the
    continuation to `out` (stdout), return the generated text. A prompt longer than the
    context keeps its last seq_len tokens, with a warning."""
    return run_generate_batch(checkpoint, [prompt], p, device_name, out, log)[0]


PAST_CONTEXT = ("recompute", "stream")


def run_generate_batch(checkpoint: str, prompts: Sequence[str], p: SamplingParams, device_name: str = "auto",
                       out=None, log: Callable[[str], None] | None = None, batch: int = 1,
                       past_context: str = "recompute", sink: int = 4) -> list[str]:
    """`gptc generate`: continue every prompt, `batch` of them decoding together (a
    ragged batch: each at its own position), and return the texts (prompt and
    continuation). One prompt streams to `out` as it is produced, as before. Several
    are written in order, each after a line "--- prompt i of n ---": the first sequence
    of each batch streams as it is produced, the others of its batch follow whole when
    the batch is done. Past the context, `past_context` "recompute" slides the window
    (exact), "stream" keeps a StreamingLLM-style cache of the first `sink` tokens and
    the most recent ones (gptc.models.build_graph's sink). Prompt i draws as sequence id
    i (generate_batch), so its text does not depend on `batch`."""
    import sys

    from gptc.tools.checkpoint import MODEL_FILE, check_tensors, find_checkpoint, load_checkpoint
    from gptc.tools.device import check_cpu_memory, cpu_memory_error, resolve_device
    from gptc.tools.tokenizer import Tokenizer
    out = out or sys.stdout
    log = log or (lambda line: print(line, file=sys.stderr))
    for prompt in prompts:
        check_prompt(prompt)
    if batch < 1:
        raise GptcError(f"--batch must be at least 1, got {batch}")
    if past_context not in PAST_CONTEXT:
        raise GptcError(f"--past-context must be one of {', '.join(PAST_CONTEXT)}, got {past_context!r}")
    stream = past_context == "stream"
    p.validate()
    ckpt = load_checkpoint(find_checkpoint(checkpoint))
    spec = ckpt.spec
    decode_graph = build_graph(spec, "decode", 1)
    check_tensors(ckpt.params, decode_graph.params, decode_graph, MODEL_FILE, ckpt.path)
    try:
        tokenizer = Tokenizer.from_json(ckpt.tokenizer_json)
    except ValueError as e:
        raise GptcError(f"checkpoint '{checkpoint}': {e}") from None
    p.validate(tokenizer.vocab_size)
    if stream:
        check_sink(spec, sink)
    else:
        sink = 0
    ids = [[int(t) for t in tokenizer.encode(prompt)] for prompt in prompts]
    for i, tokens in enumerate(ids):
        if len(tokens) > spec.model.seq_len:
            which = "the prompt" if len(ids) == 1 else f"prompt {i + 1}"
            log(f"warning: {which} has {len(tokens)} tokens, more than the context of {spec.model.seq_len}; "
                f"the model sees its last {spec.model.seq_len}")
    batch = min(batch, len(prompts))
    device = resolve_device(device_name)
    runtime = None
    memory_what = f"sampling with a context of {spec.model.seq_len} tokens"
    memory_advice = "sample on a GPU (--device gpu)"
    if device is None:
        model = cpu_model(spec, ckpt.params, batch, sink)
        check_cpu_memory(model.prefill_step.graph, memory_what, memory_advice)
    else:
        from gptc.runtime.bundle import cached_bundle
        runtime = cached_bundle(spec, device, log, sample_batch=batch, sink=sink).open(device, ckpt.params)
        model = gpu_model(runtime)
    log(f"generating on {device.name if device else 'cpu (NumPy reference executor)'} from step {ckpt.step}"
        + (f", {batch} sequences at a time" if batch > 1 else ""))
    texts: list[str] = []
    live: list[str] = []  # the text streamed so far of the sequence on screen

    def emit(text: str) -> None:
        live.append(text)
        out.write(text)
        out.flush()

    try:
        for first in range(0, len(prompts), batch):
            chunk = range(first, min(first + batch, len(prompts)))
            streams = [tokenizer.stream_decoder() for _ in chunk]
            held = [[prompts[i]] for i in chunk]  # the other sequences' text, written when the batch is done
            live.clear()
            if len(prompts) > 1:
                out.write(f"--- prompt {first + 1} of {len(prompts)} ---\n")
            emit(prompts[first])
            for new in generate_batch(model, [ids[i] for i in chunk], p, vocab_size=tokenizer.vocab_size,
                                      sequences=list(chunk)):
                emit(streams[0].feed(new[0]))
                for b in range(1, len(chunk)):
                    held[b].append(streams[b].feed(new[b]))
            emit(streams[0].flush())
            texts.append("".join(live))
            live.clear()
            for b, i in enumerate(chunk):
                if b:
                    held[b].append(streams[b].flush())
                    texts.append("".join(held[b]))
                    out.write(f"\n--- prompt {i + 1} of {len(prompts)} ---\n{texts[-1]}")
            if first + batch < len(prompts):
                out.write("\n")
    except MemoryError:
        if device is not None:
            raise
        raise cpu_memory_error(model.prefill_step.graph, memory_what, memory_advice, ran_out=True) from None
    finally:  # also when Ctrl-C or SIGTERM stops it: the text ends its line
        try:
            if runtime is not None:
                runtime.close()
        finally:
            out.write("\n")
            out.flush()
    return texts


def smoke_test(bundle, device) -> None:
    """Run every step of a bundle once on random inputs and print what came out
    (`python executor.py` inside a bundle calls this)."""
    rng = np.random.default_rng(0)
    from gptc.models import init_params
    graph = build_graph(bundle.spec, "train")
    runtime = bundle.open(device, init_params(graph, 0))
    try:
        for step, ex in runtime.steps.items():
            feeds = {}
            for name, buffer in ex.table["inputs"].items():
                b = ex.table["buffers"][buffer]
                if b["dtype"] == "i32":
                    high = {"last": 1, "pos": 1}.get(name, bundle.spec.model.vocab_size)
                    feeds[name] = rng.integers(0, high, b["shape"]).astype(np.int32)
                else:
                    feeds[name] = np.full(b["shape"], 1e-4 if name == "lr" else 1.0, np.float32)
            out = ex.run(feeds)
            summary = ", ".join(f"{k} {np.asarray(v).shape} mean {float(np.mean(v)):.4g}" for k, v in out.items())
            print(f"{step:<8} {len(ex.table['launches']):>4} launches: {summary}")
    finally:
        runtime.close()
