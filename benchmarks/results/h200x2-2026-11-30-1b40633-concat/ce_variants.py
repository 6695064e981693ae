"""Cross-entropy row kernel variants through the dev harness: the codegen's tunings plus
patched code (fast exp: __expf for expf; exp2: scores in log2 units), to see what bounds it."""
import sys, dataclasses, re
sys.path.insert(0, "."); sys.path.insert(0, "dev")
import kernel as dk
orig_render, orig_tunings = dk.render_launch, dk.tunings
PATCHES = {
    "fast_exp": lambda c: c.replace("expf(", "__expf("),
}
def render(plan, kernels, target, tuning=None):
    tuning = dict(tuning or {})
    patches = [k for k in list(tuning) if k in PATCHES and tuning.pop(k)]
    src = orig_render(plan, kernels, target, tuning)
    if not patches:
        return src
    code = src.code
    for p in patches:
        code = PATCHES[p](code)
    sym = src.symbol + "_" + "_".join(patches)
    code = code.replace(src.symbol, sym)
    return dataclasses.replace(src, code=code, symbol=sym)
def tunings(plan, kernel, target):
    base = orig_tunings(plan, kernel, target)
    return [t for t in base if "unroll" in t] + [{"fast_exp": True}, {"fast_exp": True, "unroll": 8}]
dk.render_launch, dk.tunings = render, tunings
sys.exit(dk.main(sys.argv[1:]))
