"""Time BPE training, encoding and decoding on the shipped default corpus.

    PYTHONPATH=. python3 benchmarks/tokenizer_speed.py [--vocab-size 5000] [--mb N] [--repeat 3]

Prints the corpus size, then the best of --repeat runs of: training, encoding with a
freshly loaded tokenizer (tokenizers' word cache empty) and decoding, with their speed
in MB/s of corpus text, and the compression (bytes per token). `tokenizers` runs on
every core (RAYON_NUM_THREADS=N limits it to N); the CPU time is printed too.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, TypeVar

from gptc.tools.corpus import default_corpus_text
from gptc.tools.tokenizer import Tokenizer

T = TypeVar("T")


def best_of(repeat: int, fn: Callable[[], T]) -> tuple[T, float, float]:
    """fn's result and the lowest wall-clock and CPU seconds of `repeat` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), os.times()
        out = fn()
        cpu_after = os.times()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_after.user + cpu_after.system - cpu.user - cpu.system)
    return out, min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=5000)
    ap.add_argument("--mb", type=float, default=None, help="use only the first N MB of the corpus (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each step; the best is printed (default 3)")
    args = ap.parse_args()

    text = default_corpus_text()
    if args.mb is not None:
        text = text[: int(args.mb * 1_000_000)]
    mb = len(text.encode("utf-8")) / 1e6
    print(f"corpus: {mb * 1e6:,.0f} bytes, {len(text):,} characters; {os.cpu_count()} CPUs")

    def report(what: str, wall: float, cpu: float, extra: str = "") -> None:
        print(f"{what:<8} {wall:6.2f} s  {mb / wall:6.1f} MB/s  (CPU {cpu:.2f} s){extra}")

    tok, wall, cpu = best_of(args.repeat, lambda: Tokenizer.train(text, args.vocab_size))
    report("train", wall, cpu, f"  vocab_size={tok.vocab_size}")
    saved = tok.to_json()
    ids, wall, cpu = best_of(args.repeat, lambda: Tokenizer.from_json(saved).encode(text))
    report("encode", wall, cpu, f"  {len(ids):,} tokens, {mb * 1e6 / len(ids):.2f} bytes/token")
    out, wall, cpu = best_of(args.repeat, lambda: tok.decode(ids))
    assert out == text, "round trip failed"
    report("decode", wall, cpu, "  (round trip exact)")


if __name__ == "__main__":
    main()
