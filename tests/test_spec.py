"""Specs: presets, parameter counts, TOML save/load, validation and its messages."""
from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from dataclasses import replace

import pytest

import gptc
from gptc.spec import (CHOICES, PRESETS, GptcError, ModelSpec, Spec, SpecError, TrainSpec, load_spec, lr_at,
                       spec_from_dict, spec_to_toml, validate)


# ----- presets ---------------------------------------------------------------------------
def test_presets_exist_and_validate() -> None:
    assert {"hipgpt", "gpt2", "tiny"} <= set(PRESETS)
    for name in PRESETS:
        spec = gptc.preset(name)
        assert isinstance(spec, Spec)
        assert validate(spec) is spec


def test_hipgpt_preset_is_the_seed_project() -> None:
    m, t = gptc.preset("hipgpt").model, gptc.preset("hipgpt").train
    assert (m.vocab_size, m.seq_len, m.d_model, m.n_layers, m.n_heads, m.d_ff) == (5000, 32, 128, 2, 4, 256)
    assert (t.batch_size, t.lr) == (32, 3e-4)
    assert gptc.param_count(gptc.preset("hipgpt")) == 1554312

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_param_count_gpt2_small() -> None:
    spec = gptc.preset("gpt2")
    m = spec.model
    # GPT-2 small as published: 124,439,808 with the output layer tied to wte and no
    # output bias; gptc's default adds an untied (768, 50257) output layer and its bias.
    tied = replace(spec, model=replace(m, tie_embeddings=True))
    assert gptc.param_count(tied) - m.vocab_size == 124_439_808
    assert gptc.param_count(spec) == 124_439_808 + m.vocab_size * m.d_model + m.vocab_size


def expected_params(m) -> int:
    """The parameter count of a model by formula, option by option (a dense FFN)."""
    e, f, v, hd = m.d_model, m.d_ff, m.vocab_size, m.head_dim
    norm = {"layernorm": 2 * e, "rmsnorm": e, "scalenorm": 1}[m.norm]
    attn_bias, bias = m.bias and m.attn_bias, m.bias
    qkv = (m.n_heads + 2 * m.kv_heads) * hd
    attention = e * qkv + qkv * attn_bias + e * e + e * attn_bias
    width = 2 * f if m.ffn == "swiglu" else f
    ffn = e * width + width * bias + f * e + e * bias
    embeddings = v * e + (m.seq_len * e if m.pos == "learned" else 0)
    head = (0 if m.tie_embeddings else e * v) + (v if m.bias and m.lm_head_bias else 0)
    return embeddings + m.n_layers * (2 * norm + attention + ffn) + norm + head


def test_param_count_by_formula() -> None:
    for name in PRESETS:
        assert gptc.param_count(gptc.preset(name)) == expected_params(gptc.preset(name).model), name
    base = model().model
    for norm, pos, ffn, kv, bias, attn_bias, tie in itertools.product(
            CHOICES["norm"], CHOICES["pos"], ("gelu", "swiglu"), (0, 1, 2), (True, False), (True, False), (True, False)):
        m = replace(base, norm=norm, pos=pos, ffn=ffn, n_kv_heads=kv, bias=bias, attn_bias=attn_bias, tie_embeddings=tie)
        assert gptc.param_count(Spec(m)) == expected_params(m), m


# The parameter counts the README states for each preset.
PRESET_PARAMS = {"hipgpt": 1_554_312, "gpt2": 163_087_441, "tiny": 34_816,
                 "modular": 4_439_292, "giantgpt": 2_200_148, "llama": 5_331_200}


def test_preset_param_counts_as_the_readme_states() -> None:
    assert set(PRESET_PARAMS) == set(PRESETS)
    for name, count in PRESET_PARAMS.items():
        assert gptc.param_count(gptc.preset(name)) == count, name
        assert f"{count:,}" in README, f"the README does not state {name}'s {count:,} parameters"


def test_unknown_preset() -> None:
    with pytest.raises(SpecError, match=r"unknown preset 'gpt5'; choose one of: hipgpt, gpt2, tiny, modular, giantgpt, llama"):
        gptc.preset("gpt5")


def test_specs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        gptc.preset("tiny").model.d_model = 64  # type: ignore[misc]


def test_spec_error_is_a_user_error() -> None:
    assert issubclass(SpecError, GptcError)


# ----- TOML --------------------------------------------------------------------------------
ODD = Spec(
    ModelSpec(vocab_size=1003, seq_len=37, d_model=96, n_layers=3, n_heads=3, d_ff=200, tie_embeddings=True,
              bias=False, init_std=0.0123456789012345, norm_eps=1e-6, norm="rmsnorm", n_kv_heads=1),
    TrainSpec(batch_size=5, steps=7, lr=1.5e-3, min_lr=1e-5, warmup=0, schedule="constant", betas=(0.0, 0.999),
              eps=1e-12, weight_decay=0.0, decay="all", grad_clip=0.0, seed=0),
)


@pytest.mark.parametrize("spec", [*PRESETS.values(), Spec(), ODD], ids=[*PRESETS, "default", "odd"])
def test_toml_round_trip(tmp_path, spec: Spec) -> None:
    path = tmp_path / "spec.toml"
    gptc.save_spec(spec, path)
    loaded = load_spec(path)
    assert loaded == spec
    assert isinstance(loaded.train.betas, tuple)
    assert spec_to_toml(loaded) == path.read_text(encoding="utf-8")  # deterministic, stable
    assert [p.name for p in tmp_path.iterdir()] == ["spec.toml"]      # no temporary files left


def test_toml_preset_with_overrides(tmp_path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('preset = "tiny"\n[model]\nd_model = 64\ntie_embeddings = true\n[train]\nlr = 1\n'
                    'betas = [0.5, 0.75]\n')
    spec = load_spec(path)
    tiny = gptc.preset("tiny")
    assert spec.model == replace(tiny.model, d_model=64, tie_embeddings=True)
    assert spec.train == replace(tiny.train, lr=1.0, betas=(0.5, 0.75))
    assert isinstance(spec.train.lr, float)


def test_empty_toml_is_the_default_spec(tmp_path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert load_spec(path) == Spec()


def test_missing_and_broken_files(tmp_path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 1\n")
    with pytest.raises(SpecError, match="is not valid TOML"):
        load_spec(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecError, match="is not valid TOML"):
        load_spec(binary)


# ----- validation ------------------------------------------------------------------------
def model(**kw) -> Spec:
    return Spec(replace(ModelSpec(), **kw), TrainSpec())


def train(**kw) -> Spec:
    return Spec(ModelSpec(), replace(TrainSpec(), **kw))


@pytest.mark.parametrize("spec, message", [
    (model(d_model=100, n_heads=3), r"model.d_model \(100\) must be divisible by model.n_heads \(3\)"),
    (model(vocab_size=0), "model.vocab_size must be positive, got 0"),
    (model(seq_len=-1), "model.seq_len must be positive, got -1"),
    (model(d_model=0), "model.d_model must be positive, got 0"),
    (model(n_layers=0), "model.n_layers must be positive, got 0"),
    (model(n_heads=0), "model.n_heads must be positive, got 0"),
    (model(d_ff=-5), "model.d_ff must be positive, got -5"),
    (model(n_kv_heads=3), r"model.n_kv_heads \(3\) must divide model.n_heads \(4\)"),
    (model(n_kv_heads=-1), "model.n_kv_heads"),
    (model(dropout=1.0), r"model.dropout must be in \[0, 1\)"),
    (model(init_std=0.0), "init_std"),
    (model(norm="batchnorm"), "model.norm = 'batchnorm' is not one of: layernorm, rmsnorm, scalenorm"),
    (model(pos="alibi"), "model.pos = 'alibi' is not one of"),
    (train(schedule="linear"), "train.schedule = 'linear' is not one of: cosine, constant"),
    (train(decay="some"), "train.decay = 'some' is not one of"),
    (train(precision="fp8"), "train.precision = 'fp8' is not one of"),
    (train(batch_size=0), "train.batch_size must be positive, got 0"),
    (train(steps=0), "train.steps must be positive"),
    (train(eval_interval=0), "train.eval_interval must be positive"),
    (train(lr=0.0), "train.lr must be positive"),
    (train(lr=1e-3, min_lr=1e-2), r"min_lr in \[0, lr\]"),
    (train(grad_clip=-1.0), "grad_clip must be >= 0"),
    (train(eps=0.0), "train.eps > 0"),
    (train(betas=(0.9, 1.0)), r"train.betas must be two numbers in \[0, 1\)"),
    (train(betas=(0.9,)), "train.betas must be two numbers"),
])
def test_validation_messages(spec: Spec, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate(spec)
    with pytest.raises(SpecError, match=message):  # build_graph validates first
        gptc.build_graph(spec, "infer", batch=1)


@pytest.mark.parametrize("data, message", [
    ({"model": {"d_modle": 128}}, r"unknown option 'd_modle' in \[model\]; known options: vocab_size, seq_len"),
    ({"train": {"learning_rate": 1e-3}}, r"unknown option 'learning_rate' in \[train\]"),
    ({"optimizer": {}}, "unknown section 'optimizer'"),
    ({"preset": "gpt5"}, "unknown preset 'gpt5'"),
    ({"model": 3}, r"'model' must be a table \(\[model\]\)"),
    ({"model": {"d_model": "128"}}, "model.d_model must be an integer, got '128'"),
    ({"model": {"d_model": 128.0}}, "model.d_model must be an integer, got 128.0"),
    ({"model": {"n_layers": True}}, "model.n_layers must be an integer, got True"),
    ({"model": {"tie_embeddings": 1}}, "model.tie_embeddings must be true or false, got 1"),
    ({"model": {"norm": 3}}, "model.norm must be a string, got 3"),
    ({"model": {"dropout": "0.1"}}, "model.dropout must be a number"),
    ({"train": {"lr": True}}, "train.lr must be a number, got True"),
    ({"train": {"betas": "0.9, 0.95"}}, "train.betas must be a list of numbers"),
    ({"train": {"betas": [0.9, "x"]}}, "train.betas must be a list of numbers"),
    ({"train": {"betas": [0.9, 0.95, 0.99]}}, "train.betas must be two numbers"),
    ({"model": {"d_model": 130}}, r"model.d_model \(130\) must be divisible by model.n_heads \(4\)"),
])
def test_dict_and_toml_errors(tmp_path, data: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data)


@pytest.mark.parametrize("spec, message", [
    (model(d_model="128"), "model.d_model must be an integer, got '128'"),
    (model(d_model=128.0), "model.d_model must be an integer, got 128.0"),
    (model(n_heads=None), "model.n_heads must be an integer, got None"),
    (model(tie_embeddings="no"), "model.tie_embeddings must be true or false, got 'no'"),
    (model(norm=3), "model.norm must be a string, got 3"),
    (train(lr="3e-4"), "train.lr must be a number, got '3e-4'"),
    (train(betas=0.9), "train.betas must be a list of numbers, got 0.9"),
])
def test_wrong_types_in_python_specs(spec: Spec, message: str) -> None:
    """Specs built in Python (no TOML coercion) are type-checked by validate too."""
    with pytest.raises(SpecError, match=message):
        validate(spec)


def test_python_ints_for_floats_are_fine() -> None:
    validate(train(lr=1, grad_clip=0, weight_decay=0))


def test_toml_file_errors_name_the_option(tmp_path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[model]\nd_model = "wide"\n')
    with pytest.raises(SpecError, match="model.d_model must be an integer, got 'wide'"):
        load_spec(path)
    path.write_text("[train]\nbogus = 1\n")
    with pytest.raises(SpecError, match=r"unknown option 'bogus' in \[train\]"):
        load_spec(path)


def test_implemented_non_defaults_build() -> None:
    for change in ({"n_kv_heads": 4}, {"tie_embeddings": True}, {"bias": False}, {"norm": "rmsnorm"},
                   {"norm": "scalenorm"}, {"pos": "rope"}, {"pos": "sinusoidal"}, {"ffn": "swiglu"},
                   {"ffn": "moe"}, {"attention": "linear"}, {"attention": "linear", "n_kv_heads": 2},
                   {"n_kv_heads": 2}, {"n_kv_heads": 1}, {"attention": "local", "window": 4}, {"dropout": 0.1}):
        graph = gptc.build_graph(model(**change), "infer", batch=1)
        assert ("lm_head.weight" in graph.params) != bool(change.get("tie_embeddings"))
        # bias=False drops the biases of the linear layers (the LayerNorms keep theirs)
        linear_biases = [n for n in graph.params if n.endswith(".bias") and not n.split(".")[-2].startswith("ln")]
        assert bool(linear_biases) == change.get("bias", True)


def test_build_graph_arguments() -> None:
    spec = gptc.preset("tiny")
    with pytest.raises(ValueError, match="mode must be one of"):
        gptc.build_graph(spec, "training")
    with pytest.raises(SpecError, match="exceeds the model's context of 32"):
        gptc.build_graph(spec, "infer", batch=1, seq_len=33)
    with pytest.raises(SpecError, match="must be positive"):
        gptc.build_graph(spec, "infer", batch=-1)
    g = gptc.build_graph(spec, "train", batch=3, seq_len=5)
    assert g.type(g.inputs["tokens"]).shape == (3, 5)
    assert set(g.inputs) == {"tokens", "targets", "lr", "step"}
    assert set(g.outputs) == {"loss", "grad_norm"}


def test_choices_defaults_are_the_dataclass_defaults() -> None:
    for name, choices in CHOICES.items():
        obj = ModelSpec() if hasattr(ModelSpec(), name) else TrainSpec()
        assert getattr(obj, name) == choices[0], name


# ----- learning-rate schedule --------------------------------------------------------------
def test_lr_schedule() -> None:
    t = TrainSpec(lr=1.0, min_lr=0.1, warmup=10, steps=110)
    assert lr_at(t, 0) == pytest.approx(0.1)
    assert lr_at(t, 9) == pytest.approx(1.0)
    assert lr_at(t, 10) == pytest.approx(1.0)
    assert lr_at(t, 60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(t, 110) == pytest.approx(0.1)
    assert lr_at(t, 500) == pytest.approx(0.1)
    assert lr_at(replace(t, schedule="constant"), 50) == 1.0
    assert lr_at(replace(t, warmup=0), 0) == pytest.approx(1.0)


FLOAT_FIELDS = [(section, f.name) for section, cls in (("model", ModelSpec), ("train", TrainSpec))
                for f in dataclasses.fields(cls) if f.type in ("float", "tuple[float, float]")]


def test_every_float_field_is_listed() -> None:
    assert ("train", "lr") in FLOAT_FIELDS and ("train", "betas") in FLOAT_FIELDS and len(FLOAT_FIELDS) >= 9


@pytest.mark.parametrize("section, name", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused(tmp_path, section: str, name: str, bad: float) -> None:
    base = Spec()
    value = (0.9, bad) if name == "betas" else bad
    spec = dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **{name: value})})
    with pytest.raises(SpecError, match=rf"{section}\.{name} must be finite, got .*(inf|nan)"):
        validate(spec)
    text = {math.inf: "inf", -math.inf: "-inf"}.get(bad, "nan")
    path = tmp_path / "spec.toml"
    path.write_text(f"[{section}]\n{name} = {'[0.9, ' + text + ']' if name == 'betas' else text}\n")
    with pytest.raises(SpecError, match=rf"{section}\.{name} must be finite"):
        load_spec(path)


@pytest.mark.parametrize("spec", [train(batch_size=10**21), model(seq_len=10**12), model(vocab_size=10**20),
                                  model(d_model=2 * 10**18, n_heads=2), model(d_ff=10**19)])
def test_absurd_sizes_are_refused(spec: Spec) -> None:
    with pytest.raises(SpecError, match="too large: one of its tensors would hold .* more than 64-bit"):
        validate(spec)
