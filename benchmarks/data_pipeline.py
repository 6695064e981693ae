"""Throughput and memory of the data pipeline on a large corpus (CPU): `gptc prepare` on a
generated corpus, then `gptc train --data DIR --device cpu --steps 20 --preset tiny` on
its shards. Prints MB/s and the peak resident memory of each command (the sum over the
command's processes, sampled every 0.1 s, and the largest single process), then deletes
everything it wrote.

The corpus: copies of the bundled Shakespeare corpus, each with its lines shuffled
(seeded by the copy's number) and one line in 20 given an extra random lowercase word
(so that the text keeps meeting words it has not seen), written as files of about
256 MB in one directory.

    PYTHONPATH=. python3 benchmarks/data_pipeline.py [--gb 2] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from gptc.common import usable_cpus
from gptc.tools.corpus import default_corpus_text

FILE_BYTES = 256 * 10**6


def make_corpus(directory: Path, total_bytes: int) -> int:
    """Write the corpus; its size in bytes."""
    lines = np.array(default_corpus_text().splitlines(keepends=True), dtype=object)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    written, copy, f, n_file = 0, 0, None, 0
    while written < total_bytes:
        rng = np.random.default_rng(copy)
        shuffled = lines[rng.permutation(len(lines))]
        for i in np.flatnonzero(rng.random(len(shuffled)) < 0.05):
            word = "".join(rng.choice(letters, rng.integers(4, 11)))
            shuffled[i] = shuffled[i].rstrip("\n") + " " + word + "\n"
        raw = "".join(shuffled).encode("utf-8")[:total_bytes - written]
        if f is None or f.tell() >= FILE_BYTES:
            if f is not None:
                f.close()
            f = open(directory / f"part{n_file:03d}.txt", "wb")
            n_file += 1
        f.write(raw)
        written += len(raw)
        copy += 1
    f.close()
    return written


def tree_rss(root: int) -> list[int]:
    """Resident bytes of `root` and of each of its descendants now."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    members, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in members:
                members.add(child)
                frontier.append(child)
    sizes = []
    for pid in members:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) * 1024)
        except OSError:
            pass
    return sizes


def measure(argv: list[str]) -> tuple[float, int, int]:
    """(seconds, peak summed RSS, peak single-process RSS) of a command; its output is shown."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    pump = threading.Thread(target=lambda: [print(line, end="", flush=True) for line in proc.stdout])
    pump.start()
    peak = single = 0
    while proc.poll() is None:
        sizes = tree_rss(proc.pid)
        peak, single = max(peak, sum(sizes)), max([single, *sizes])
        time.sleep(0.1)
    pump.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with status {proc.returncode}")
    return time.perf_counter() - started, peak, single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="corpus size in GB (10**9 bytes)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (deleted afterwards)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptc-data-pipeline-", dir=args.dir))
    try:
        (work / "corpus").mkdir()
        started = time.perf_counter()
        size = make_corpus(work / "corpus", int(args.gb * 10**9))
        print(f"corpus: {size:,} bytes in {len(list((work / 'corpus').iterdir()))} files, generated in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
        gptc = [sys.executable, "-m", "gptc"]
        seconds, peak, single = measure(gptc + ["prepare", str(work / "corpus"), "-o", str(work / "prepared")])
        prepare_line = (f"prepare: {size / 1e6 / seconds:.1f} MB/s ({size / 1e6:,.0f} MB in {seconds:.0f}s, "
                        f"{usable_cpus()} jobs, {usable_cpus()} usable cores), peak RSS {peak / 2**20:,.0f} MiB over all processes, "
                        f"{single / 2**20:,.0f} MiB in the largest")
        seconds, peak, single = measure(gptc + ["train", "--data", str(work / "prepared"), "--device", "cpu",
                                                   "--steps", "20", "--preset", "tiny", "--out", str(work / "run")])
        print(prepare_line)
        print(f"train: {seconds:.0f}s for 20 steps, peak RSS {peak / 2**20:,.0f} MiB over all processes, "
              f"{single / 2**20:,.0f} MiB in the largest")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
