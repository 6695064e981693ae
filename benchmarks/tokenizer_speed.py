"""Time BPE training and encoding on the shipped default corpus (one CPU core).

    PYTHONPATH=. python3 benchmarks/tokenizer_speed.py [--vocab-size 5000] [--mb N]

Prints the corpus size, the training time, the encoding time and the
compression (bytes per token). Pure Python: one core whatever the machine.
"""

from __future__ import annotations

import argparse
import time

from gptc.tools.corpus import default_corpus_text
from gptc.tools.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=5000)
    ap.add_argument("--mb", type=float, default=None, help="use only the first N MB of the corpus (default: all)")
    args = ap.parse_args()

    text = default_corpus_text()
    if args.mb is not None:
        text = text[: int(args.mb * 1_000_000)]
    n_bytes = len(text.encode("utf-8"))
    print(f"corpus: {n_bytes:,} bytes, {len(text):,} characters")

    t0 = time.perf_counter()
    tok = Tokenizer.train(text, args.vocab_size)
    t_train = time.perf_counter() - t0
    print(f"train  vocab_size={tok.vocab_size}: {t_train:.2f} s")

    fresh = Tokenizer(tok.merges)  # empty encode cache
    t0 = time.perf_counter()
    ids = fresh.encode(text)
    t_enc = time.perf_counter() - t0
    print(f"encode (cold cache): {t_enc:.2f} s, {len(ids):,} tokens, {n_bytes / len(ids):.2f} bytes/token")

    t0 = time.perf_counter()
    out = tok.decode(ids)
    t_dec = time.perf_counter() - t0
    assert out == text, "round trip failed"
    print(f"decode: {t_dec:.2f} s (round trip exact)")


if __name__ == "__main__":
    main()
