"""`gptc inspect`: the kernels of a bundle as a table, and its fusion graph as DOT."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from gptc.runtime.bundle import Bundle
from gptc.common import write_atomic
from gptc.spec import GptcError, describe_options


def kernel_table(table: dict) -> str:
    rows = [("kernel", "family", "nodes", "grid", "block", "MB moved", "MFLOP", "scopes")]
    for k in table["launches"]:
        rows.append((k["kernel"], k["family"], str(k["nodes"]), "x".join(map(str, k["grid"])),
                     str(k["block"][0]), f"{k.get('bytes', 0) / 1e6:.3f}", f"{k.get('flops', 0) / 1e6:.3f}",
                     k["scopes"][:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def fusion_dot(table: dict, title: str) -> str:
    """Kernels as nodes, an edge where one kernel reads a buffer another wrote."""
    colours = {"pointwise": "lightblue", "row": "palegreen", "reduce": "khaki", "matmul": "salmon", "scatter": "plum",
               "group_sort": "lightgrey", "grouped_matmul": "lightsalmon", "sample_tokens": "wheat"}
    writer = {}
    lines = [f'digraph "{title}" {{', "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica];"]
    for i, k in enumerate(table["launches"]):
        label = f"{k['kernel']}\\n{k['nodes']} nodes\\n{k['scopes'][:40]}"
        lines.append(f'  k{i} [label="{label}", fillcolor={colours.get(k["family"], "white")}];')
        for b in k.get("reads", []):
            if b in writer and writer[b] != i:
                lines.append(f"  k{writer[b]} -> k{i};")
        for b in k.get("writes", []):
            writer[b] = i
    lines.append("}")
    return "\n".join(dict.fromkeys(lines)) + "\n"


def inspect_bundle(path: str, step: str = "train", dot_path: str | None = None) -> None:
    bundle = Bundle(path)
    if step not in bundle.tables:
        raise GptcError(f"the bundle has no step '{step}'; give --step one of {', '.join(bundle.tables)}")
    table = bundle.tables[step]
    m = bundle.spec.model
    print(f"bundle {path}: target {bundle.target.name}, gptc {bundle.manifest['versions']['gptc']}, "
          f"{'fused' if bundle.manifest['fused'] else 'unfused'}")
    options = describe_options(m)
    print(f"model: d_model {m.d_model}, layers {m.n_layers}, heads {m.n_heads}, d_ff {m.d_ff}, "
          f"vocab {m.vocab_size}, context {m.seq_len}{'; ' + options if options else ''}; "
          f"batch {bundle.spec.train.batch_size}")
    for name, t in bundle.tables.items():
        print(f"  {name:<8} {len(t['launches']):>4} launches")
    print(f"\n{step} step:")
    print(kernel_table(table))
    if dot_path:
        dot = fusion_dot(table, f"{Path(path).name} {step}")
        try:
            write_atomic(dot_path, dot)
        except OSError as e:
            raise GptcError(f"cannot write '{dot_path}': {e.strerror}") from None
        print(f"\nfusion graph written to {dot_path}")
        if shutil.which("dot"):
            svg = str(Path(dot_path).with_suffix(".svg"))
            subprocess.run(["dot", "-Tsvg", dot_path, "-o", svg], check=False)
            print(f"and rendered to {svg}")
