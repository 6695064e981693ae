"""The `gptc` command line."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from gptc.common import first_file_in
from gptc.spec import CHOICES, PRESETS, GptcError, Spec, load_spec, preset, validate

DEMO_DIR = Path("runs") / "demo"  # where `gptc demo` trains, so that the README's commands run as printed


class _Parser(argparse.ArgumentParser):
    """argparse with gptc's errors: one line, `gptc: error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gptc: error: {message} (see: {self.prog} --help)\n")


def _nonempty(text: str) -> str:
    """A command-line name or path; an empty one (e.g. from an unset shell variable) is refused."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _finite_float(text: str) -> float:
    """A command-line number; inf and nan are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got '{text}'")
    return value


def _spec_from_args(args: argparse.Namespace) -> Spec:
    if args.spec and args.preset:
        raise GptcError("give either a spec file or --preset, not both")
    spec = load_spec(args.spec) if args.spec else preset(args.preset or "hipgpt")
    train = spec.train
    for name in ("steps", "lr", "batch", "precision"):
        value = getattr(args, name, None)
        if value is not None:
            train = replace(train, **{"batch_size" if name == "batch" else name: value})
    model = spec.model
    if getattr(args, "vocab_size", None) is not None:
        model = replace(model, vocab_size=args.vocab_size)
    return validate(replace(spec, model=model, train=train))


def _cmd_train(args: argparse.Namespace) -> None:
    from gptc.tools.train import train
    bundle = None
    if args.spec and os.path.isdir(args.spec):
        if not os.path.isfile(os.path.join(args.spec, "manifest.json")):
            raise GptcError(f"'{args.spec}' is a directory but not a bundle (no manifest.json); "
                            "give a spec file, a bundle or --preset")
        if args.preset:
            raise GptcError("give either a bundle or --preset, not both")
        bundle = args.spec
    # With --resume (or a bundle) and no spec, the run's (the bundle's) own spec is used.
    given = bool(args.spec or args.preset) and bundle is None
    spec = _spec_from_args(args) if given or not (args.resume or bundle) else None
    origin = args.resume or args.init_from
    name = args.preset or (os.path.basename(os.path.normpath(args.spec)).removesuffix(".toml") if args.spec
                           else os.path.basename(os.path.normpath(origin)) if origin else "hipgpt")
    if args.gpus != 1:
        from gptc.tools.launch import launch_train, strip_option
        if args.gpus < 1:
            raise GptcError(f"--gpus must be at least 1, got {args.gpus}")
        if "WORLD_SIZE" in os.environ:
            raise GptcError("--gpus starts one process per GPU itself; under a launcher (WORLD_SIZE is set) leave it out")
        if args.device == "cpu":
            raise GptcError("--gpus trains on GPUs; leave out --device cpu")
        argv = strip_option(args.argv[args.argv.index("train") + 1:], "--gpus")
        default_out = None if args.resume else str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        launch_train(argv, args.gpus, args.out, default_out)
        return
    train(spec, args.data, device=args.device, out_dir=args.out, resume=args.resume, steps=args.steps,
          lr=args.lr, batch=args.batch, vocab_size=args.vocab_size, name=name, bundle=bundle, tokenizer=args.tokenizer,
          init_from=args.init_from, precision=args.precision, zero1=args.zero1)


def _cmd_export(args: argparse.Namespace) -> None:
    from gptc.tools.hf import export_hf  # --format has one choice today, hf (argparse refuses others)
    export_hf(args.path, args.output)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from gptc.tools.prepare import prepare
    prepare(args.data, args.output, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
            shard_tokens=args.shard_tokens, jobs=args.jobs)


def _cmd_demo(args: argparse.Namespace) -> None:
    """The main job: compile the default model, train it on the bundled corpus on the
    best device here, and print a sample. It trains in runs/demo (or --out); a directory
    that holds an earlier run is refused, never overwritten."""
    from gptc.tools.checkpoint import list_checkpoints
    from gptc.tools.generate import SamplingParams, check_prompt, run_generate
    from gptc.tools.train import train
    sampling = SamplingParams(num_tokens=args.num_tokens, temperature=0.8, top_k=40, seed=0).validate()
    check_prompt(args.prompt)
    spec = preset(args.preset)
    out = Path(args.out) if args.out else DEMO_DIR
    if list_checkpoints(out):
        raise GptcError(f"'{out}' holds an earlier run, which the demo does not overwrite; sample from it with: "
                        f"gptc generate --checkpoint {out} --prompt TEXT; or run the demo again with --out DIR "
                        f"(or after deleting '{out}')")
    result = train(spec, None, device=args.device, out_dir=out, steps=args.steps, name=f"demo-{args.preset}")
    print(f"\nsample ({args.num_tokens} tokens, temperature 0.8, top-k 40, seed 0):")
    run_generate(str(result.run_dir), args.prompt, sampling, args.device)


def _cmd_plan(args: argparse.Namespace) -> None:
    from gptc.models import build_graph
    from gptc.compiler.planner import fusion_report, make_plan
    spec = _spec_from_args(args)
    graph = build_graph(spec, args.mode)
    print(f"{args.mode} graph of {args.spec or args.preset or 'hipgpt'}: {len(graph)} nodes, batch {spec.train.batch_size}")
    print(fusion_report(make_plan(graph, True), make_plan(graph, False)))


def _cmd_compile(args: argparse.Namespace) -> None:
    from gptc.runtime.bundle import check_output_dir, compile_bundle
    from gptc.target import UnknownTargetError, parse_target
    check_output_dir(Path(args.output))
    spec = _spec_from_args(args)
    if args.seq_len is not None:
        spec = validate(replace(spec, model=replace(spec.model, seq_len=args.seq_len)))
    if args.target == "auto":
        from gptc.tools.device import resolve_device
        device = resolve_device("auto")
        if device is None:
            raise GptcError("no GPU here to take the target from; name one with --target (e.g. cuda:sm_90, hip:gfx90a)")
        target = device.target
    else:
        try:
            target = parse_target(args.target)
        except UnknownTargetError as e:
            raise GptcError(str(e)) from None
    print(f"compiling {args.spec or args.preset or 'hipgpt'} for {target.name} ({'fused' if not args.no_fuse else 'unfused'})")
    compile_bundle(spec, args.output, target, fuse=not args.no_fuse)


def _cmd_generate(args: argparse.Namespace) -> None:
    from gptc.tools.generate import SamplingParams, read_prompt_file, run_generate_batch
    params = SamplingParams(num_tokens=args.num_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, greedy=args.greedy, seed=args.seed)
    prompts = [args.prompt] if args.prompt is not None else read_prompt_file(args.prompt_file)
    run_generate_batch(args.checkpoint, prompts, params, args.device, batch=args.batch,
                       past_context=args.past_context, sink=args.sink)


def _cmd_inspect(args: argparse.Namespace) -> None:
    from gptc.tools.inspect import inspect_bundle
    if args.dot is not None and not Path(args.dot).resolve().parent.is_dir():
        raise GptcError(f"cannot write --dot '{args.dot}': the directory '{Path(args.dot).parent}' does not exist")
    inspect_bundle(args.bundle, args.step, args.dot)


def _cmd_bench(args: argparse.Namespace) -> None:
    if args.gemm:
        from gptc.tools.bench.gemm import gemm_main
        out = args.out or "runs/bench"
        if first_file_in(out):
            raise GptcError(f"cannot use '{out}' as the output directory: '{first_file_in(out)}' is a file, not a "
                            "directory; choose another --out")
        gemm_main(out, args.device)
        return
    from gptc.tools.bench import bench_main
    from gptc.tools.bench.config import COMPARES, WHATS, BenchConfig, parse_list, resolve_spec
    spec, name = resolve_spec(args.preset, args.batch)
    if args.precision is not None:
        spec = validate(replace(spec, train=replace(spec.train, precision=args.precision)))
    if args.zero1 and args.gpus == 1:
        raise GptcError("--zero1 times ZeRO-1 on several GPUs; give it with --gpus N")
    if args.gpus != 1:
        from gptc.tools.bench.multi import bench_gpus
        if args.gpus < 2:
            raise GptcError(f"--gpus must be at least 2 to compare with one GPU, got {args.gpus}")
        bench_gpus(spec, args.gpus, args.out or "runs/bench", zero1=args.zero1)
        return
    if args.repeats is not None and args.repeats < 1:
        raise GptcError("--repeats must be at least 1")
    out = args.out or "runs/bench"
    if first_file_in(out):
        raise GptcError(f"cannot use '{out}' as the output directory: '{first_file_in(out)}' is a file, not a "
                        "directory; choose another --out")
    what = parse_list(args.what, WHATS + ("decode",), "what") if args.what else WHATS
    if "decode" in what:  # generation speed: its own peers and report (gptc/tools/bench/decode.py)
        from gptc.tools.bench.decode import PEERS, DecodeConfig, bench_decode_main
        batches = tuple(_positive_ints(args.batches, "--batches")) if args.batches else DecodeConfig.batches
        bench_decode_main(DecodeConfig(spec, name, batches, parse_list(args.compare, PEERS, "compare"),
                                       repeats=args.repeats or 20, smoke=args.smoke), out, args.device)
        what = tuple(w for w in what if w != "decode")
        if not what:
            return
    elif args.smoke or args.batches:
        raise GptcError("--smoke and --batches go with --what decode")
    cfg = BenchConfig(spec, name, what, parse_list(args.compare, COMPARES, "compare"),
                      repeats=args.repeats or 20, per_kernel=not args.no_kernels)
    bench_main(cfg, out, args.device)


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=CHOICES["precision"],
                   help="train.precision: fp32, or bf16 mixed precision (bf16 matmul operands, f32 master weights)")


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise GptcError(f"{flag} takes positive integers separated by commas, got '{text}'")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gptc", description="Compile GPT models into fused GPU kernels, train and sample.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on a text file")
    p.add_argument("spec", type=_nonempty, nargs="?", help="a spec TOML file or a bundle directory (or use --preset)")
    p.add_argument("--preset", type=_nonempty, help=f"a preset model: {', '.join(PRESETS)}")
    p.add_argument("--data", type=_nonempty,
                   help="what to train on: a UTF-8 text file, a directory or glob of them, a directory written by "
                        "gptc prepare, or token shards (.bin files: llm.c's format; a directory or glob of them) "
                        "(default: the bundled Shakespeare corpus)")
    p.add_argument("--tokenizer", type=_nonempty, metavar="FILE",
                   help="the tokenizer.json to use (default: the prepared data's, or the one beside the shards, or "
                        "one trained on the text)")
    p.add_argument("--steps", type=int, help="number of optimizer steps (on the CPU the default is capped to a few "
                                             "minutes of work)")
    p.add_argument("--lr", type=_finite_float, help="peak learning rate")
    p.add_argument("--batch", type=int, help="sequences per step")
    _add_precision(p)
    p.add_argument("--vocab-size", type=int, help="model.vocab_size: the tokenizer's vocabulary and the model's "
                                                  "embedding rows (e.g. smaller than a preset's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where to train (auto: a GPU if there is one, else the CPU)")
    p.add_argument("--out", type=_nonempty,
                   help="run directory: spec, tokenizer, metrics.jsonl, loss.png, checkpoints/ "
                                 "(default: runs/NAME-DATE-TIME)")
    p.add_argument("--resume", type=_nonempty, metavar="RUNDIR",
                   help="continue the run in RUNDIR from its newest checkpoint; with --out NEWDIR, fork it (or an "
                        "older checkpoint, RUNDIR/checkpoints/step-N) into a new run")
    p.add_argument("--init-from", type=_nonempty, metavar="HFDIR",
                   help="start from a Hugging Face GPT-2 or LLaMA model saved by save_pretrained (config.json, "
                        "model.safetensors, tokenizer.json): its model, weights and tokenizer; a spec file or "
                        "--preset gives only the train section")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train on N GPUs of this host, one process each (data parallel; --batch is per GPU). "
                        "Under torchrun, srun or mpirun leave it out: gptc reads RANK, WORLD_SIZE, LOCAL_RANK, "
                        "MASTER_ADDR and MASTER_PORT")
    p.add_argument("--zero1", action="store_true",
                   help="with several GPUs, shard the AdamW state across them (ZeRO-1)")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("prepare", help="tokenize text files, directories or globs into token shards (llm.c's .bin "
                                       "format) for gptc train --data DIR")
    p.add_argument("data", type=_nonempty, nargs="+", metavar="DATA",
                   help="UTF-8 text files, directories (every text file below them) or globs ('web/**/*.txt')")
    p.add_argument("-o", "--output", type=_nonempty, required=True, metavar="DIR",
                   help="the directory to write (new or empty): tokenizer.json, NAME_val_000000.bin, "
                        "NAME_train_000001.bin, ..., prepare.json")
    p.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this many tokens on a sample of the data "
                                                  "(default: the hipgpt preset's vocabulary)")
    p.add_argument("--tokenizer", type=_nonempty, metavar="FILE",
                   help="use this tokenizer.json instead of training one")
    p.add_argument("--shard-tokens", type=int, metavar="N",
                   help="tokens per shard (default 100,000,000, as llm.c's fineweb.py)")
    p.add_argument("--jobs", type=int, metavar="N", help="worker processes (default: one per CPU core this process may use)")
    p.set_defaults(run=_cmd_prepare)

    p = sub.add_parser("demo", help="the main job: compile, train on the bundled corpus, print a sample")
    p.add_argument("--preset", type=_nonempty, default="hipgpt", help="the model (default hipgpt)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where to run (auto: GPU if present)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's; fewer on a CPU)")
    p.add_argument("--out", type=_nonempty, help=f"run directory (default {DEMO_DIR}; one that holds a run is refused)")
    p.add_argument("--prompt", default="ROMEO:", help="the text the sample continues")
    p.add_argument("--num-tokens", type=int, default=100, help="tokens to sample")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("compile", help="compile a model into a kernel bundle")
    p.add_argument("spec", type=_nonempty, nargs="?", help="a spec TOML file (or use --preset)")
    p.add_argument("--preset", type=_nonempty, help=f"a preset model: {', '.join(PRESETS)}")
    p.add_argument("-o", "--output", type=_nonempty, required=True, help="the bundle directory to write")
    p.add_argument("--target", type=_nonempty, default="auto",
                   help="auto (this machine's GPU), or hip:gfx90a, cuda:sm_90, ...")
    p.add_argument("--no-fuse", action="store_true", help="one kernel per primitive op (the benchmark baseline)")
    p.add_argument("--batch", type=int, help="sequences per training step")
    _add_precision(p)
    p.add_argument("--seq-len", type=int, help="context length")
    p.set_defaults(run=_cmd_compile)

    p = sub.add_parser("generate", help="sample text from a trained checkpoint (prefill, then KV-cache decode)")
    p.add_argument("--checkpoint", type=_nonempty, required=True,
                   help="a run directory (its newest checkpoint) or a checkpoint directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", type=_nonempty, metavar="FILE",
                        help="continue every line of FILE (one prompt per line, UTF-8)")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences decoded together, of any lengths (default 1; with --prompt-file)")
    p.add_argument("--past-context", default="recompute", choices=["recompute", "stream"],
                   help="once a text outgrows the context: recompute the sliding window (exact, a prefill "
                        "per token) or stream (keep the first --sink tokens and the most recent ones in the "
                        "KV cache, StreamingLLM-style)")
    p.add_argument("--sink", type=int, default=4, help="tokens kept at the start with --past-context stream (default 4)")
    p.add_argument("--num-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temp", type=_finite_float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=_finite_float, default=1.0,
                   help="nucleus sampling: smallest set with this probability (0, 1]")
    p.add_argument("--repetition-penalty", type=_finite_float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, help="random seed (>= 0): same seed, same text")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where to run (auto: GPU if present)")
    p.set_defaults(run=_cmd_generate)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers model directory")
    p.add_argument("path", type=_nonempty, metavar="RUNDIR",
                   help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("-o", "--output", type=_nonempty, required=True, metavar="DIR",
                   help="the directory to write (new or empty): config.json, model.safetensors, tokenizer.json, "
                        "tokenizer_config.json")
    p.add_argument("--format", default="hf", choices=["hf"],
                   help="hf: a transformers model directory (GPT2LMHeadModel or LlamaForCausalLM)")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("inspect", help="show the kernels of a bundle and its fusion graph")
    p.add_argument("bundle", type=_nonempty, help="a bundle directory (from gptc compile)")
    p.add_argument("--step", default="train", type=_nonempty,
                   help="which step: train, eval, prefill, decode, or a shorter prefill (prefill_<length>; the "
                        "bundle's steps are listed)")
    p.add_argument("--dot", type=_nonempty,
                   help="write the fusion graph as Graphviz DOT to this file (and .svg when graphviz is installed)")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("plan", help="print the fusion plan of a model: kernels fused vs unfused, memory")
    p.add_argument("spec", type=_nonempty, nargs="?", help="a spec TOML file (or use --preset)")
    p.add_argument("--preset", type=_nonempty, help=f"a preset model: {', '.join(PRESETS)}")
    p.add_argument("--mode", default="train", choices=["train", "eval", "infer"], help="which step to plan")
    p.add_argument("--batch", type=int, help="sequences per step")
    _add_precision(p)
    p.set_defaults(run=_cmd_plan)

    p = sub.add_parser("bench", help="time fused vs unfused kernels and PyTorch on a GPU; writes JSON, Markdown, PNG")
    p.add_argument("--preset", type=_nonempty, metavar="NAME|SPEC",
                   help=f"a preset ({', '.join(PRESETS)}) or a spec TOML file (default hipgpt)")
    p.add_argument("--batch", type=int, help="sequences per step (default: the spec's)")
    _add_precision(p)
    p.add_argument("--what", type=_nonempty, metavar="LIST",
                   help="train,infer (default both), or decode: generation speed (TTFT, tokens/s) against PyTorch")
    p.add_argument("--batches", type=_nonempty, metavar="LIST", help="--what decode: the batch sizes (default 1,8,64)")
    p.add_argument("--smoke", action="store_true",
                   help="--what decode on the CPU (reference executor, PyTorch on the CPU): checks the path, not speed")
    p.add_argument("--compare", type=_nonempty, metavar="LIST",
                   help="unfused,torch-eager,torch-compile,torch-cudagraphs (default all; the torch columns "
                        "are skipped where PyTorch is not installed)")
    p.add_argument("--out", type=_nonempty, metavar="DIR",
                   help="where bench.json, bench.md, bench.png and roofline.png go (default runs/bench)")
    p.add_argument("--repeats", type=int, help="at least this many timed steps per figure (default 20)")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-kernel timing tables")
    p.add_argument("--gemm", action="store_true",
                   help="instead: bf16 matmul TFLOP/s at 4096^3 and gpt2's shapes against torch.matmul (cuBLAS); "
                        "writes gemm.json and gemm.md")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "hip"], help="which GPU (default auto)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="training tokens/s on 1 and on N GPUs of this host (data parallel, --batch per GPU), the "
                        "scaling efficiency and the communication the backward does not hide")
    p.add_argument("--zero1", action="store_true", help="with --gpus: also time ZeRO-1 optimizer sharding")
    p.set_defaults(run=_cmd_bench)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and `docker stop` send), raised where Ctrl-C raises
    KeyboardInterrupt, so that every command stops the same way: the trainer saves a
    checkpoint (it handles both signals itself while it trains), generate ends its line."""
    signum = signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0, 2 for bad input, 128 + the signal number when
    stopped by SIGINT (130) or SIGTERM (143)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --gpus` runs the same command per GPU
    warnings.formatwarning = lambda message, *_: f"gptc: warning: {message}\n"  # one line, no source excerpt
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        args.run(args)
    except GptcError as e:
        print(f"gptc: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`gptc generate ... | head`): stop quietly, like SIGPIPE
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush is quiet too
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except MemoryError:  # the trainer and the sampler say what was too big; this is for the rest
        print(f"gptc: error: out of memory in gptc {args.command}; give it less to hold (a smaller corpus, "
              "--batch or model.seq_len) or more memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"gptc: {'interrupted' if signum == signal.SIGINT else 'terminated'}", file=sys.stderr)
        return 128 + signum
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
