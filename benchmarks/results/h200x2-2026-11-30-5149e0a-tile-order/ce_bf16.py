"""Cross-entropy from bf16 logits (autocast's lm_head output) vs f32 logits: dev harness families."""
import sys
sys.path.insert(0, "."); sys.path.insert(0, "dev")  # run from the repository root
import kernel as dk
from gptc.compiler import dsl
from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Graph
def ce_bf16(rows, vocab):
    g = Graph(); logits = g.input("logits", (rows, vocab), "bf16"); targets = g.input("targets", (rows,), "i32", bound=vocab)
    x = logits.cast("f32")
    loss = dsl.cross_entropy(x, targets)
    g.output("loss", loss)
    g.output("dlogits", gradients(loss, [x])[0].cast("bf16"))
    return g
dk.FAMILIES["cross_entropy_bf16"] = (ce_bf16, (8192, 50257), "rows,vocab")
dk.KERNEL_FAMILY["cross_entropy_bf16"] = "row"
sys.exit(dk.main(sys.argv[1:]))
