"""The bf16 step errors (test_gpu_precision.check_bf16_step's numbers, printed, not asserted) of
a few specs, for one variant of the codegen: the worst gradient and update, and
h.0.mlp.c_fc.weight's update, each with the bf16-fp32 distance."""
import sys
sys.path.insert(0, "tests")
import numpy as np
import gptc
from gptc.compiler.codegen import kernels
from gptc.runtime.device import open_device
from gptc.runtime.reference import run_graph
from conftest import rel_err, update_errors
from test_gpu_kernels import SPECS, run_both, training_feeds
from test_precision import with_precision

variant = sys.argv[1]
if variant == "rows1":  # row kernels an element a thread-step, as before d53f07e
    kernels._row_lanes = lambda *a: 1
device = open_device("auto")
for name in ("mqa",):
    spec = SPECS[name] if name in SPECS else gptc.preset(name)
    g16 = gptc.build_graph(with_precision(spec, "bf16"), "train", expose_gradients=True)
    g32 = gptc.build_graph(spec, "train", expose_gradients=True)
    feeds = training_feeds(spec, g16, np.random.default_rng(1))
    out, updates, ref = run_both(device, g16, feeds, True)
    fp32 = run_graph(g32, feeds, np.float64)
    grads = {k: rel_err(out[k], ref["outputs"][k]) for k in ref["outputs"] if k.startswith("grad.")}
    gdist = {k: rel_err(fp32["outputs"][k], ref["outputs"][k]) for k in grads}
    ups = update_errors(feeds, updates, ref["updates"])
    udist = update_errors(feeds, fp32["updates"], ref["updates"])
    wg, wu = max(grads, key=grads.get), max(ups, key=ups.get)
    print(f"{variant:8s} {name:10s} grad {wg} {grads[wg]:.2e} (dist {gdist[wg]:.2e}) median ratio "
          f"{np.median([grads[k] / gdist[k] for k in grads]):.2f} | update {wu} {ups[wu]:.3f} (dist {udist[wu]:.3f}) "
          f"c_fc {ups.get('h.0.mlp.c_fc.weight', float('nan')):.3f} median ratio "
          f"{np.median([ups[k] / max(udist[k], 1e-12) for k in ups]):.2f}", flush=True)
