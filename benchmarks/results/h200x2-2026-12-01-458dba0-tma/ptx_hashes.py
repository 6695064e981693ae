"""The PTX of every launch of some presets' bf16 train and prefill steps for sm_90, hashed
(the kernel's own symbol replaced, since it hashes the source): two checkouts whose hashes
match compile to the same code. Needs cuda-python's NVRTC, no GPU.

    python3 ptx_hashes.py CHECKOUT OUT.json gpt2 hipgpt llama

OUT.json maps preset/step/index/kernel to (kind, hash): kind "mma-ptx" for the launches
on the matrix units (they paste templates/mma_fragments.h), "ptx" for the others."""
import dataclasses
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor

root = sys.argv[1]
sys.path.insert(0, root)
from cuda.bindings import nvrtc  # noqa: E402
from gptc.compiler.codegen.kernels import render_plan  # noqa: E402
from gptc.compiler.planner import make_plan  # noqa: E402
from gptc.models import build_graph  # noqa: E402
from gptc.spec import preset  # noqa: E402
from gptc.target import parse_target  # noqa: E402


def ptx_hash(source: str, symbol: str) -> str:
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"k.cu", 0, [], [])
    opts = [b"-arch=compute_90a", b"-std=c++17", b"-DWARP_SIZE=32"]
    err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    assert int(err) == 0, symbol
    err, size = nvrtc.nvrtcGetPTXSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetPTX(prog, buf)
    text = "\n".join(line for line in buf.decode().splitlines() if not line.strip().startswith("//"))
    return hashlib.sha256(text.replace(symbol, "SYM").encode()).hexdigest()[:16]


out = {}
for name in sys.argv[3:]:
    spec = preset(name)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, precision="bf16"))
    for mode in ("train", "prefill"):
        plan = make_plan(build_graph(spec, mode, spec.train.batch_size if mode == "train" else 1), True)
        kernels = render_plan(plan, parse_target("cuda:sm_90"))
        distinct = {k.symbol: k for k in kernels if k.code}
        with ThreadPoolExecutor(2) as pool:
            hashes = dict(zip(distinct, pool.map(lambda k: ptx_hash(k.code, k.symbol), distinct.values())))
        for i, k in enumerate(kernels):
            if k.code:
                kind = "mma-ptx" if "GPTC_HAS_MMA_NV" in k.code else "ptx"
                out[f"{name}/{mode}/{i}/{k.name}"] = (kind, hashes[k.symbol])
json.dump(out, open(sys.argv[2], "w"), indent=0)
print(len(out), "launches,", sum(v[0] == "mma-ptx" for v in out.values()), "on the matrix units")
