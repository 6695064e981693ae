"""The schema of a bundle's manifest.json, checked on load so that a damaged or
hand-edited manifest gives one line naming the bad field instead of a KeyError.

A schema is plain data: a type (the value must be one), a dict of fixed keys (each
required), {str: schema} (a mapping of any keys), or [schema] (a list)."""
from __future__ import annotations

from typing import Any

INT, STR = int, str
BUFFER = {"dtype": STR, "shape": [INT], "nbytes": INT, "arena": STR, "offset": INT, "role": STR}
TENSOR_MAP = {"offset": INT, "dims": [INT], "strides": [INT], "box": [INT]}
LAUNCH = {"kernel": STR, "family": STR, "symbol": STR, "grid": [INT], "block": [INT], "shared": INT, "args": [STR],
          "tensor_maps": {STR: TENSOR_MAP},
          "clear": [STR], "nodes": INT, "kernels": [STR], "reads": [STR], "writes": [STR], "bytes": INT,
          "flops": INT, "scopes": STR}
TABLE = {"arena_bytes": {"persistent": INT, "activations": INT, "io": INT}, "buffers": {STR: BUFFER},
         "inputs": {STR: STR}, "bounds": {STR: INT}, "outputs": {STR: STR}, "output_shapes": {STR: [INT]},
         "persistent": {STR: STR},
         "params": [STR], "launches": [LAUNCH]}
MANIFEST = {"format": INT, "versions": {"gptc": STR, "compiler": STR},
            "target": {"vendor": STR, "arch": STR, "wavefront": INT, "shared_mem": INT, "matrix_cores": STR,
                       "shared_mem_max": INT},
            "fused": bool, "spec": {"model": dict, "train": dict},
            "steps": {"train": TABLE, "eval": TABLE, "prefill": TABLE, "decode": TABLE},
            "code": {STR: {"file": STR, "sha256": STR}}}


def schema_error(value: Any, schema: Any, where: str = "") -> str | None:
    """The first place where `value` does not follow `schema`, described; None if it does."""
    if isinstance(schema, type):
        # bool is an int in Python, and a JSON true must not pass as a size
        ok = isinstance(value, schema) and not (schema is int and isinstance(value, bool))
        return None if ok else f"{where or 'the manifest'} should be {schema.__name__}, not {type(value).__name__}"
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} should be a list"
        return next((e for i, v in enumerate(value) if (e := schema_error(v, schema[0], f"{where}[{i}]"))), None)
    if not isinstance(value, dict):
        return f"{where or 'the manifest'} should be an object"
    if set(schema) == {str}:
        return next((e for k, v in value.items() if (e := schema_error(v, schema[str], f"{where}.{k}"))), None)
    for key, sub in schema.items():
        if key not in value:
            return f"{where + '.' if where else ''}{key} is missing"
        e = schema_error(value[key], sub, f"{where + '.' if where else ''}{key}")
        if e:
            return e
    return None


def reference_error(manifest: dict) -> str | None:
    """Names the manifest uses that it does not define: buffers of launches, inputs and
    outputs, and code objects of launches."""
    for step, table in manifest["steps"].items():
        named = [*table["inputs"].values(), *table["outputs"].values(), *table["persistent"].values()]
        named += [b for launch in table["launches"] for b in (*launch["args"], *launch["clear"])]
        missing = next((b for b in named if b not in table["buffers"]), None)
        if missing:
            return f"steps.{step} names buffer '{missing}', which it does not define"
        symbol = next((launch["symbol"] for launch in table["launches"] if launch["symbol"] not in manifest["code"]), None)
        if symbol:
            return f"steps.{step} launches '{symbol}', which has no code object"
    return None


def manifest_error(manifest: Any) -> str | None:
    return (schema_error(manifest, MANIFEST)
            or next((e for name, table in manifest["steps"].items()  # the prefill_<L> steps too
                     if (e := schema_error(table, TABLE, f"steps.{name}"))), None)
            or reference_error(manifest))
