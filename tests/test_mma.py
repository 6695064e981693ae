"""The bf16 matmul on the matrix units without a GPU: the template is chosen by target
(never by trying: hiprtc aborts on an intrinsic its arch lacks), its sources render
for every operand layout and alignment and compile with NVRTC (sm_80, sm_90) and
hiprtc (gfx90a, gfx908), the tile choice and the copy width follow the shape and the
strides. tests/test_gpu_mma.py runs them against NumPy on a GPU."""
from __future__ import annotations

import re

import pytest

from gptc import dsl
from gptc.compiler.codegen.kernels import (TensorMap, _mma_config, _mma_kind, _mma_legal, _mma_smem_bytes,
                                           _mma_stages, _mma_tiles, _mma_vector, prelude, render_launch, render_plan)
from gptc.compiler.ir import Graph
from gptc.compiler.planner import make_plan
from gptc.runtime.device import compile_many
from gptc.target import KNOWN_TARGETS, parse_target

from test_multi_executor import RecordingDevice

COMPILE_TARGETS = ["cuda:sm_90", "cuda:sm_80", "hip:gfx90a", "hip:gfx908"]


def layouts_graph(bf16: bool = True) -> Graph:
    """Every operand layout, awkward sizes, a batch, slices of every alignment, fused
    epilogues with f32 and bf16 stores."""
    dt = "bf16" if bf16 else "f32"
    g = Graph()
    for i, (a_t, b_t) in enumerate([(False, False), (True, False), (False, True), (True, True)]):
        m, n, k = 67 + i, 131, 45 + 2 * i
        a = g.input(f"a{i}", (k, m) if a_t else (m, k), dt)
        b = g.input(f"b{i}", (n, k) if b_t else (k, n), dt)
        bias = g.input(f"bias{i}", (n,))
        y = dsl.gelu((a.T if a_t else a) @ (b.T if b_t else b) + bias)
        g.output(f"y{i}", y.cast("bf16") if i % 2 else y)
    wide = g.input("wide", (40, 64 + 5), dt)
    for pad in range(5):  # offsets 0..4 of a 69-wide buffer: 16-, 8-, 4-, 2-byte copies
        g.output(f"s{pad}", wide.slice(1, pad, pad + 64) @ g.input(f"w{pad}", (64, 24), dt))
    x, w = g.input("x", (3, 33, 17), dt), g.input("w", (3, 17, 5), dt)
    g.output("batched", (x @ w) * 0.5)
    return g


def mma_kernels(target: str, bf16: bool = True, tuning: dict | None = None):
    """The matmul launches of layouts_graph for `target` (with `tuning`: kernels.tunings)."""
    plan = make_plan(layouts_graph(bf16), True)
    if tuning is None:
        return [k for k in render_plan(plan, parse_target(target)) if k.family == "matmul"]
    return [render_launch(plan, [plan.kernels[i] for i in launch], parse_target(target), tuning)
            for launch in plan.launches if plan.kernels[launch[0]].family == "matmul"]


def test_fragment_kind_by_target():
    kinds = {t.arch: _mma_kind(t) for t in KNOWN_TARGETS.values()}
    assert kinds == {"gfx906": None, "gfx908": "mfma_x4", "gfx90a": "mfma", "gfx942": "mfma", "gfx1030": None,
                     "gfx1100": None, "sm_80": "nv", "sm_86": "nv", "sm_89": "nv", "sm_90": "wgmma"}


@pytest.mark.parametrize("target", sorted(t.name for t in KNOWN_TARGETS.values()))
def test_template_chosen_by_target(target):
    """bf16 operands run on the matrix units where the target has them (wgmma on sm_90,
    mma.sync with ldmatrix and cp.async on the other NVIDIA targets, MFMA on CDNA), the
    SIMT template elsewhere; f32 operands always take the SIMT template."""
    kind = _mma_kind(parse_target(target))
    issued = "wgmma.mma_async" if kind == "wgmma" else "gptc_mma(cf"
    codes = [k.code[len(prelude()):] for k in mma_kernels(target)]
    assert all((issued in c) == bool(kind) for c in codes)
    if kind == "nv":
        assert all("gptc_ldmatrix_x4(af" in c and "gptc_ldmatrix_x4(q" in c and "gptc_copy_async<" in c for c in codes)
        assert any("true)" in c for c in codes) and any("false)" in c for c in codes)  # ldmatrix .trans and not
    if kind == "wgmma":  # every operand layout: k-major (transpose 0) and m- or n-major (1) A and B; the
        # operands staged by cp.async (rows not 16-byte aligned) made visible to wgmma's reads by a proxy fence
        assert all(("gptc_copy_chunk8<" in c) == ("gptc_fence_proxy_async();" in c) for c in codes)
        assert any("gptc_tma_load<" in c for c in codes) and any("gptc_copy_chunk8<" in c for c in codes)
        for flags in ("0, 0;", "1, 0;", "0, 1;", "1, 1;"):
            assert any(f"p, 1, 1, {flags}" in c for c in codes), flags
    assert not any(issued in k.code for k in mma_kernels(target, bf16=False))


@pytest.mark.parametrize("target", COMPILE_TARGETS)
def test_mma_sources_compile(target, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path))
    kernels = mma_kernels(target) + mma_kernels(target, bf16=False)
    objects = compile_many([(k.code, k.name) for k in kernels], parse_target(target))
    assert len(objects) == len(kernels) and all(objects)


def test_simt_reads_bf16_operands_on_other_targets(tmp_path, monkeypatch):
    """gfx1030 (no matrix units in the table) computes bf16 operands with the SIMT template."""
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path))
    kernels = mma_kernels("hip:gfx1030")
    assert all("bf16_to_float(" in k.code for k in kernels)
    assert all(compile_many([(k.code, k.name) for k in kernels], parse_target("hip:gfx1030")))


def test_copy_width_follows_alignment():
    assert _mma_vector(0, [768, 1], 1) == 8
    assert _mma_vector(0, [50257, 1], 1) == 1     # gpt2's vocab rows: 2-byte copies
    assert _mma_vector(4, [768, 1], 1) == 4
    assert _mma_vector(0, [2 * 768 * 3, 770, 1], 2) == 2  # a batch stride counts too
    assert _mma_vector(8, [1, 64], 0) == 8


def test_copy_widths_in_sources():
    """mma.sync copies chunks of the rows' alignment; wgmma's producer 8 bf16 a step,
    with cp.async where rows are 16-byte aligned, else loads of 4, 2 or 1."""
    code = "".join(k.code[len(prelude()):] for k in mma_kernels("cuda:sm_80"))
    for v in (8, 4, 2, 1):
        assert f"gptc_copy_async<{v}>(" in code
    code = "".join(k.code[len(prelude()):] for k in mma_kernels("cuda:sm_90", tuning={"tma": False}))
    assert "gptc_copy_async<8>(" in code
    for v in (4, 2, 1):
        assert f"gptc_copy_chunk8<{v}>(" in code and f"gptc_copy_async<{v}>(" not in code


def test_whole_slabs_unchecked():
    """wgmma's producer stages a 16-byte-aligned operand's slab from one address a thread
    at constant offsets when every chunk is whole and inside the matrix (stage_whole),
    else chunk by chunk with checks; an unaligned operand always the checked way."""
    whole_total = unaligned = 0
    for k in mma_kernels("cuda:sm_90", tuning={"tma": False}):
        code = k.code[len(prelude()):]
        whole = code.count("(idx_t)l *")  # stage_whole's offsets: a loop an aligned operand (of each part)
        checked = code.count("rem = ")    # the checked copies: a loop an operand
        assert checked % 2 == 0 and whole <= checked and code.count("gptc_copy_async<8>(") == 2 * whole, k.name
        assert whole == 0 or re.search(r"if \(.* <= .* && .* <= .*\) \{", code), k.name
        whole_total, unaligned = whole_total + whole, unaligned + checked - whole
    assert whole_total and unaligned  # the layouts graph has both kinds of operand


def test_tensor_maps_describe_the_operands(tmp_path, monkeypatch):
    """wgmma stages an operand by TMA where its rows and batches are 16-byte aligned: a
    tensor map of its buffer names the contiguous axis, the other one, then the batch
    axes that move it (a broadcast one is left out), read in boxes 64 wide by the tile's
    rows (k contiguous) or by 64 k; rows of 33 bf16, and a row broadcast along m, are
    staged by cp.async (a proxy fence then makes them visible to wgmma), beside a TMA
    operand in the same kernel."""
    g = Graph()
    x, w = g.input("x", (2, 3, 40, 64), "bf16"), g.input("w", (1, 3, 64, 24), "bf16")
    g.output("y", x @ w.broadcast_to((2, 3, 64, 24)))
    g.output("z", g.input("u", (40, 33), "bf16") @ g.input("v", (33, 16), "bf16"))
    g.output("r", g.input("row", (1, 64), "bf16").broadcast_to((100, 64)) @ g.input("v2", (64, 16), "bf16"))
    g.output("t", g.input("x2", (4, 64, 1024), "bf16").T @ g.input("y2", (4, 64, 520), "bf16"))
    plan = make_plan(g, True)
    kernels = [k for k in render_plan(plan, parse_target("cuda:sm_90")) if k.family == "matmul"]
    name_of = {nid: name for name, nid in plan.graph.inputs.items()}
    maps = {name_of[a.node]: a for k in kernels for a in k.args if isinstance(a, TensorMap)}
    assert maps["x"][1:4] == (0, (64, 40, 2, 3), (64, 7680, 2560)) and maps["x"].box[0] == 64
    assert maps["x"].box[2:] == (1, 1) and maps["x"].box[1] in (64, 128)  # k contiguous: the tile's rows
    assert maps["w"][1:] == (0, (24, 64, 3), (24, 1536), (64, 64, 1))  # n contiguous, the broadcast axis left out
    # m- and n-contiguous (a transpose): a box an atom of 64 columns, several a stage
    assert maps["x2"][1:] == (0, (1024, 64, 4), (1024, 65536), (64, 64, 1))
    assert maps["y2"][1:] == (0, (520, 64, 4), (520, 33280), (64, 64, 1))
    assert "u" not in maps and "v" in maps and "row" not in maps and "v2" in maps  # (a broadcast row: stride 0)
    code = "".join(k.code for k in kernels)
    assert "gptc_copy_chunk8<1>(" in code and "gptc_fence_proxy_async();" in code
    parts = [part for k in kernels for part in k.source.split("// C[b] = A[b]")[1:]]
    assert len(parts) == 4
    several = False
    for part in parts:  # a stage's barrier waits for all of its TMA boxes' bytes (all of the stage's, or B's)
        stage = re.search(r"stages \((\d+) bytes each\)", part).group(1)
        boxes = re.findall(r"operand (\w): (\d+) TMA box\(es\) of (\d+)x64 bf16", part)
        expected = re.findall(r"gptc_mbarrier_(arrive_)?expect_tx\(full0 \+ 8u \* slot, (\d+)u\)", part)
        assert len(expected) == 1 and int(expected[0][1]) == sum(int(n) * int(rows) * 128 for _, n, rows in boxes)
        several = several or any(int(n) > 1 for _, n, _ in boxes)
        copies = re.search(r"gptc_copy_\w+<\d>\(s", part)  # an operand staged by cp.async
        assert (expected[0][0] == "arrive_") == (not copies)  # mixed: thread 0 expects the bytes, all arrive
        assert expected[0][0] or [name for name, _, _ in boxes] == ["B"]
        assert not expected[0][0] or expected[0][1] == stage
    assert several  # (an operand read in one box a stage hid a byte count that missed the others)
    assert all(compile_many([(k.code, k.name) for k in kernels], parse_target("cuda:sm_90")))


def test_tile_choice():
    sm80, sm90 = parse_target("cuda:sm_80"), parse_target("cuda:sm_90")
    assert _mma_config(4096, 4096, 4096, 1, sm80)[:2] == (128, 128)
    assert _mma_config(768, 768, 8192, 1, sm80)[:2] == (64, 64)  # too few big tiles to fill 108 units
    assert _mma_config(4096, 4096, 4096, 1, sm80) is _mma_config(4096, 4096, 4096, 1, sm80)  # cached
    assert _mma_config(4096, 4096, 4096, 1, sm90)[:2] == (128, 256)
    assert _mma_config(768, 768, 8192, 1, sm90)[:2] == (64, 128)
    assert _mma_config(8192, 768, 768, 1, sm90)[:2] == (128, 192)  # 256 tiles: 2 waves of 0.75 a 128x256's work
    assert _mma_config(768, 3072, 8192, 1, sm90)[:2] == (128, 192)  # 96 of 132 units busy, not 72
    for target in ("cuda:sm_90", "cuda:sm_80", "hip:gfx90a", "hip:gfx908"):
        t = parse_target(target)
        for bm, bn, wm, wn in _mma_tiles(t):  # every tile fits
            assert _mma_legal((bm, bn, wm, wn), t, _mma_stages(bm, bn, t))
            assert _mma_smem_bytes(bm, bn, _mma_stages(bm, bn, t), t) <= t.max_shared
    assert _mma_stages(128, 128, sm80) == 3 and _mma_stages(64, 64, sm80) == 4
    assert _mma_stages(128, 256, sm90) == 4  # 4 x 48 KiB of the 227 KiB a block may opt in to
    # wgmma: 4 stages whatever fits (5 and 6 measured no faster, 64x128 and 128x192 slower), 64x256's 5
    assert [_mma_stages(bm, bn, sm90) for bm, bn, _, _ in _mma_tiles(sm90)] == [4, 4, 4, 5, 4, 4]


# ----- gptc bench --gemm, the parts that need no GPU -------------------------------------
def test_bench_gemm_without_gpu_torch_one_line_exit_2(monkeypatch, capsys):
    from gptc.tools.bench import peers
    from gptc.tools.cli import main
    monkeypatch.setattr(peers, "import_torch", lambda: (None, "PyTorch is not installed"))
    assert main(["bench", "--gemm"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "gptc: error: gptc bench --gemm compares with torch.matmul: PyTorch is not installed\n"


def test_bench_gemm_shapes_run_on_the_matrix_units():
    """Every shape of the bench renders one matmul_wgmma kernel for sm_90 (and the sum of its
    partial products where it is split along k: c_proj's dW); gpt2's vocab rows (50257
    bf16, odd) take 2-byte copies, the others 16-byte ones."""
    from gptc.tools.bench.gemm import GEMM_SHAPES
    from gptc.tools.bench.measure import gptc_gemm_graph
    for label, m, n, k, a, b in GEMM_SHAPES:
        kernels = render_plan(make_plan(gptc_gemm_graph(m, n, k, a, b), True), parse_target("cuda:sm_90"))
        (kernel,) = [kern for kern in kernels if kern.family == "matmul"]
        assert any(kern.family == "reduce" for kern in kernels) == (label == "c_proj dW=X^T@dY"), label
        assert "wgmma.mma_async" in kernel.code, label
        odd = "lm_head dX" in label or "lm_head dW" in label
        assert ("gptc_copy_chunk8<1>" in kernel.code) == odd, label
        assert "gptc_tma_load<" in kernel.code, label  # the operands of 16-byte aligned rows


def test_bench_gemm_report():
    from gptc.tools.bench.gemm import render_gemm_md
    row = dict(shape="square 4096", m=4096, n=4096, k=4096, a="k", b="n", gptc_ms=0.5, torch_ms=0.2, floor_ms=0.2,
               gptc_tflops=275.0, torch_tflops=687.2, of_torch=0.4, of_floor=0.4, rel_err=0.0)
    md = render_gemm_md(dict(rows=[row, dict(row, of_torch=0.7)], copy_bytes_per_s=4.2e12, bf16_peak_flops=6.8e14,
                             meta=dict(gpu="NVIDIA H200 (cuda:sm_90)", date="2026-11-30", commit="abc1234",
                                       torch="2.11.0")))
    assert "NVIDIA H200 (cuda:sm_90), 2026-11-30, commit abc1234" in md
    assert "| 275.0 | 687.2 | 40.0 | 40.0 | 0.0e+00 | NO |" in md and md.rstrip().endswith("| yes |")


# ----- wgmma's shared memory: beyond 48 KiB, dynamic, named in the plan table, passed at launch -----------
class SharedRecorder(RecordingDevice):
    """Also records each launch's shared bytes and the tensor maps it encodes."""

    def prepare_launch(self, function, grid, block, shared, args, name=""):
        self.shared = {**getattr(self, "shared", {}), name: shared}
        self.args = args
        return super().prepare_launch(function, grid, block, shared, args, name)

    def tensor_map(self, address, dims, strides, box):
        from gptc.runtime.drivers import tensor_map
        self.maps = [*getattr(self, "maps", []), (address, tuple(dims), tuple(strides), tuple(box))]
        return tensor_map([len(self.maps)] * 16)


def test_wgmma_stages_take_dynamic_shared_memory():
    """A wgmma tile's stages exceed the 48 KiB a block gets without opting in: the launch
    declares its pool extern (sized at launch), the plan table names the bytes and the
    executor passes them; the mma.sync kernels of sm_80 keep a static pool (0 bytes)."""
    from gptc.runtime.build import plan_table
    from gptc.runtime.executor import Arenas, GpuExecutor
    g = Graph()
    g.output("c", g.input("a", (4096, 768), "bf16") @ g.input("b", (768, 2304), "bf16"))
    plan = make_plan(g, True)
    sm90, sm80 = parse_target("cuda:sm_90"), parse_target("cuda:sm_80")
    (kernel,) = [k for k in render_plan(plan, sm90) if k.family == "matmul"]
    bm, bn = _mma_config(4096, 2304, 768, 1, sm90)[:2]
    assert sm90.shared_mem < kernel.shared_bytes <= sm90.max_shared
    assert kernel.shared_bytes >= _mma_smem_bytes(bm, bn, _mma_stages(bm, bn, sm90), sm90)
    assert "extern __shared__ gptc_f4 gptc_smem[];" in kernel.code
    table = plan_table(plan, [kernel])
    assert table["launches"][0]["shared"] == kernel.shared_bytes
    dev = SharedRecorder()
    ex = GpuExecutor(table, dev, {kernel.symbol: b"code"}, Arenas(dev, [table]))
    assert dev.shared == {kernel.name: kernel.shared_bytes}
    # both operands by TMA: tensor maps of their buffers, encoded by the device, passed by value
    a, b = (ex.address(table["inputs"][name]) for name in "ab")
    assert dev.maps == [(a, (768, 4096), (768,), (64, bm)), (b, (2304, 768), (2304,), (64, 64))]
    assert [arg.kind for arg in dev.args] == ["tensor_map", "tensor_map", "ptr"]
    ex.close()
    (old,) = [k for k in render_plan(plan, sm80) if k.family == "matmul"]
    assert old.shared_bytes == 0 and "__shared__ gptc_f4 gptc_smem[" in old.code and "extern __shared__" not in old.code


def test_wgmma_epilogue_keeps_each_roots_type(tmp_path, monkeypatch):
    """A fused epilogue may end in a bool, an i32 or an f64 (a comparison, a cast): the
    wgmma template keeps each result in an array of its own C type between the loads
    and the stores, and the source compiles (NVRTC, sm_90a)."""
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path))
    g = Graph()
    c = g.input("a", (130, 96), "bf16") @ g.input("b", (96, 200), "bf16")
    g.output("negative", c < 0.0)
    g.output("sign", (c < 0.0).cast("i32"))
    g.output("wide", c.cast("f64"))
    target = parse_target("cuda:sm_90")
    kernels = [k for k in render_plan(make_plan(g, True), target) if k.family == "matmul"]
    code = "".join(k.code for k in kernels)
    assert "wgmma.mma_async" in code
    for declared in ("bool out", "int out", "double out"):
        assert declared in code, declared
    assert all(compile_many([(k.code, k.name) for k in kernels], target))


def epilogue_chunks_graph(n: int, f32_root: bool) -> Graph:
    """A bf16 matmul (200 x 72 @ 72 x n) whose fused epilogue reads inputs that move with
    the column one element at a time (an f32 bias, a bf16 residual), one broadcast along
    the columns (a scale a row) and one transposed (its columns 200 elements apart), and
    stores bf16 (a cast root), bool and (`f32_root`) f32 results (tests/test_gpu_mma.py
    runs it)."""
    g = Graph()
    c = g.input("a", (200, 72), "bf16") @ g.input("b", (72, n), "bf16")
    y = ((c + g.input("bias", (n,))) * g.input("scale", (200, 1)) + g.input("res", (200, n), "bf16").cast("f32")
         + g.input("res_t", (n, 200)).T)
    if f32_root:
        g.output("y", y)
    g.output("y16", y.cast("bf16"))
    g.output("negative", c < 0.0)
    return g


# (n, an f32 root) -> the columns a wgmma epilogue thread takes at a time (kernels._epilogue_lanes)
EPILOGUE_LANES = {(136, False): 8, (136, True): 4, (132, False): 4, (131, False): 1, (131, True): 1}


@pytest.mark.parametrize("n,f32_root", list(EPILOGUE_LANES))
def test_wgmma_epilogue_in_chunks_of_columns(n, f32_root, tmp_path, monkeypatch):
    """Each wgmma consumer thread takes chunks of consecutive columns, 16 bytes of each
    root (8 bf16, 4 where a root is f32), fewer where n is no multiple of that: the inputs
    that move with the column one element at a time are read a chunk at once, the others
    a lane at a time; f32 and bf16 roots are stored a chunk at once (the bf16 cast's
    rounding done by the store: one conversion), the bool root a lane at a time. With
    chunks of 1 (n = 131) each thread-step is one column, as before. The source compiles
    (NVRTC, sm_90a)."""
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path))
    target = parse_target("cuda:sm_90")
    (kernel,) = [k for k in render_plan(make_plan(epilogue_chunks_graph(n, f32_root), True), target)
                 if k.family == "matmul"]
    code, lanes = kernel.source, EPILOGUE_LANES[n, f32_root]
    assert f"chunk(s) of {lanes} a thread at a time" in code
    if lanes > 1:
        at = rf"gm \* {n} \+ gc"
        assert re.search(rf"gptc_load{lanes}\(bias \+ gc\)", code) and re.search(rf"gptc_load{lanes}\(res \+ \({at}\)\)", code)
        assert re.search(r"= scale\[gm\];", code) and re.search(rf"= res_t\[gn \* 200 \+ gm\];", code)
        stored = re.findall(rf"gptc_store{lanes}\(out_(y|y16) \+ \({at}\), out\d \+ c \* {lanes}\);", code)
        assert sorted(stored) == (["y", "y16"] if f32_root else ["y16"])
        assert re.search(rf"out_negative\[gm \* {n} \+ gn\] = out\d\[u\];", code)
        assert ("(col ^ ((col >> 3) & 4))" in code) == (lanes == 8)  # the epilogue tile's swizzle
    else:
        assert not re.search(r"= gptc_load\d\(|gptc_store\d\(out|gn = gc \+ l;", code)
    assert "bf16_to_float(float_to_bf16(" not in code  # the cast root: rounded by its store alone
    assert all(compile_many([(kernel.code, kernel.name)], target))


def _tile_order(m_tiles: int, n_tiles: int, group: int, blocks: int) -> list[tuple[int, int, int]]:
    """(batch, m tile, n tile) of each block_id, by evaluating the C lines of
    templates/matmul_tiles.hip.j2 (declarations, integer division, one ?:) in Python."""
    from gptc.compiler.codegen.kernels import _environment
    source = _environment().from_string('{% from "matmul_tiles.hip.j2" import tile_origin %}'
                                        '{{ tile_origin(mt, nt, 16, 32, g) }}').render(mt=m_tiles, nt=n_tiles, g=group)
    code = []
    for line in source.splitlines():
        line = line.strip()
        if not line.startswith("const idx_t "):
            continue
        for decl in re.split(r", (?=\w+ = )", line.removeprefix("const idx_t ").rstrip(";")):
            name, expr = decl.split(" = ", 1)
            expr = re.sub(r"^(.+) \? (.+) : (.+)$", r"(\2 if \1 else \3)", expr.replace("/", "//"))
            code.append(f"{name} = {expr}")
    order = []
    for block_id in range(blocks):
        env = {"block_id": block_id}
        exec("\n".join(code), {}, env)
        order.append((env["batch"], env["m0"] // 16, env["n0"] // 32))
    return order


@pytest.mark.parametrize("m_tiles, n_tiles, group", [(5, 3, 1), (5, 3, 2), (64, 7, 8), (7, 4, 8), (9, 2, 9)])
def test_tile_order_visits_every_tile_once_in_groups(m_tiles, n_tiles, group):
    """The matmul templates' tile order: each block_id of a 2-batch grid names a distinct
    tile; blocks walk `group` rows of tiles at a time, m fastest inside a group (so the
    blocks in flight share a few panels of A and of B); group 1 is n fastest."""
    tiles = m_tiles * n_tiles
    order = _tile_order(m_tiles, n_tiles, group, 2 * tiles)
    assert sorted(order) == [(b, i, j) for b in range(2) for i in range(m_tiles) for j in range(n_tiles)]
    for start in range(0, tiles, group * n_tiles):  # a group: its rows of tiles only, m fastest
        rows = range(start // n_tiles, min(start // n_tiles + group, m_tiles))
        chunk = order[start:start + len(rows) * n_tiles]
        assert [(i, j) for _, i, j in chunk] == [(i, j) for j in range(n_tiles) for i in rows]


def test_long_products_take_the_widest_tile():
    """From k = WGMMA_LONG_K the narrow wgmma tiles are L2-bound (gpt2's lm_head dX on an
    H200: 64x256 2.14 ms, 128x256 1.45 ms), so the tile choice uses their long-k rates:
    the widest tiles that fill the units (128x192: 256 tiles, 0.88 ms against 128x256's
    0.99 with B n-contiguous), never 64 rows."""
    sm90 = parse_target("cuda:sm_90")
    assert _mma_config(8192, 768, 50257, 1, sm90)[:2] == (128, 192)
    assert _mma_config(768, 50257, 8192, 1, sm90)[:2] == (128, 256)
    assert _mma_config(8192, 768, 3072, 1, sm90)[:2] == (128, 192)


def test_tile_group_streams_the_larger_operand_once():
    """m fastest (a group of every row of tiles) where B is over twice A, else n fastest."""
    from gptc.compiler.codegen.kernels import _tile_group
    assert _tile_group(8192, 50257) == 8192 and _tile_group(768, 50257) == 768  # lm_head, its weight gradient
    assert _tile_group(8192, 3072) == 1 and _tile_group(4096, 4096) == 1 and _tile_group(8192, 768) == 1
