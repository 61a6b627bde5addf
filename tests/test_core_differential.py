"""funcpeft vs PEFT 0.21.2 on tiny random models: outputs, adapter gradients, counts, resolved config."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import MODELS, Pair, as_type, capture_stdout, funcpeft_lora_modules, out_tensor, peft_lora_modules

import funcpeft
from funcpeft import testing as T
from funcpeft.grad import value_and_grad

CASES: dict[str, tuple[str, dict]] = {
    "llama-all-linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama3-all-linear-compressed": ("llama3", dict(r=2, target_modules="all-linear")),
    "llama-rslora-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"down_proj": 3},
        ),
    ),
    "llama-embedding-init-false": (
        "llama",
        dict(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
    ),
    "llama-exclude-list": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "mlp.up_proj"])),
    "mistral-layers-pattern": (
        "mistral",
        dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "qwen2-layer-int-exclude-regex": (
        "qwen2",
        dict(
            target_modules=["q_proj", "v_proj", "up_proj"],
            layers_to_transform=0,
            exclude_modules=r".*\.v_proj",
        ),
    ),
    "qwen2-bias-lora-only": ("qwen2", dict(target_modules=["q_proj", "o_proj"], bias="lora_only")),
    "gpt2-conv1d-wte": ("gpt2", dict(r=4, target_modules=["c_attn", "wte"])),
    "gpt2-all-linear-bias-all": ("gpt2", dict(target_modules="all-linear", bias="all", init_lora_weights="gaussian")),
    "bert-seq-cls": ("bert", dict(task_type="SEQ_CLS", r=4)),
    "bert-seq-cls-bias-all": (
        "bert",
        dict(task_type="SEQ_CLS", target_modules=["query", "dense"], bias="all", modules_to_save=["pooler"]),
    ),
    "t5-default-targets": ("t5", dict(r=4, lora_alpha=4)),
    "custom-conv": ("conv", dict(r=2, lora_alpha=4, target_modules=["conv2d", "conv1d", "fc"], bias="lora_only")),
}

# config fields that PEFT resolves at get_peft_model time or that the user set: all must agree
SKIP_FIELDS = {"runtime_config"}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request: pytest.FixtureRequest) -> Pair:
    kind, config = CASES[request.param]
    return Pair(kind, config)


def test_outputs_match_peft(pair: Pair) -> None:
    with torch.no_grad():
        want = out_tensor(pair.peft_model(**pair.inputs))
        got = out_tensor(pair.fn(pair.base, pair.adapter, **pair.inputs))
        base_out = out_tensor(pair.model(**pair.inputs))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5
    assert not torch.allclose(got, base_out, atol=1e-4), "the random adapter should change the output"


def test_gradients_match_peft(pair: Pair) -> None:
    want_out, want = pair.peft_out_and_grads()
    assert all(g is not None for e in want.values() for g in e.values())
    got_func = torch.func.grad(pair.funcpeft_loss)(pair.adapter)
    T.assert_trees_close(got_func, want, atol=1e-5)
    loss, got_vg = value_and_grad(pair.funcpeft_loss)(pair.adapter)
    T.assert_trees_close(got_vg, want, atol=1e-5)
    assert torch.allclose(loss, (want_out * pair.loss_weights(want_out)).mean(), atol=1e-6)


def test_targets_and_counts_match_peft(pair: Pair) -> None:
    assert funcpeft_lora_modules(pair.fpm) == peft_lora_modules(pair.peft_model)
    assert pair.fpm.get_nb_trainable_parameters() == pair.peft_model.get_nb_trainable_parameters()
    want = capture_stdout(pair.peft_model.print_trainable_parameters)
    assert capture_stdout(pair.fpm.print_trainable_parameters) == want
    assert want.startswith("trainable params: ")


def test_resolved_config_matches_peft(pair: Pair) -> None:
    ours = pair.fpm.peft_config["default"]
    theirs = pair.peft_model.peft_config["default"]
    assert isinstance(ours, funcpeft.LoraConfig)
    for f in dataclasses.fields(ours):
        if f.name in SKIP_FIELDS:
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert pair.config.get("target_modules") != "all-linear" or isinstance(ours.target_modules, set)


def test_conv1d_fan_in_fan_out_warning_matches_peft(pair: Pair) -> None:
    def fan_in_warnings(ws: list[warnings.WarningMessage]) -> list[str]:
        return [str(w.message) for w in ws if "fan_in_fan_out" in str(w.message)]

    assert fan_in_warnings(pair.f_warnings) == fan_in_warnings(pair.p_warnings)
    if pair.kind == "gpt2":
        assert fan_in_warnings(pair.f_warnings), "GPT-2 Conv1D targets must force fan_in_fan_out with a warning"
        assert as_type(pair.fpm.peft_config["default"], funcpeft.LoraConfig).fan_in_fan_out is True


def test_user_config_not_mutated() -> None:
    config = funcpeft.LoraConfig(target_modules=["c_attn"])
    before = dataclasses.asdict(config)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        fpm = funcpeft.get_peft_model(MODELS["gpt2"](), config)
    assert dataclasses.asdict(config) == before
    assert as_type(fpm.peft_config["default"], funcpeft.LoraConfig).fan_in_fan_out is True


def test_all_linear_compression_happened() -> None:
    """At >= 20 matched modules PEFT stores suffixes instead of full names; check the case really covers it."""
    ours = as_type(
        Pair("llama3", CASES["llama3-all-linear-compressed"][1]).fpm.peft_config["default"], funcpeft.LoraConfig
    ).target_modules
    assert ours == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


INIT_CASES = [
    ("llama", dict(target_modules=["q_proj", "embed_tokens"], init_lora_weights=init))
    for init in (True, False, "gaussian")
] + [
    ("conv", dict(r=2, target_modules=["conv2d", "conv1d"], init_lora_weights=init))
    for init in (True, False, "gaussian")
]


@pytest.mark.parametrize(("kind", "config"), INIT_CASES, ids=[f"{k}-{c['init_lora_weights']}" for k, c in INIT_CASES])
def test_fresh_init_matches_peft_distribution(kind: str, config: dict) -> None:
    """Same shapes, dtypes, all-zero leaves and (within sampling noise) the same spread as PEFT's init."""
    pair = Pair(kind, config)
    named = pair.peft_fresh
    for path, entry in pair.fresh.items():
        for key, ours in entry.items():
            theirs = named[T.peft_param_name(path, key, pair.plan[path])]
            where = f"{path}.{key}"
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, where
            assert ours.requires_grad and ours.is_leaf, where
            assert bool((ours == 0).all()) == bool((theirs == 0).all()), where
            if not (theirs == 0).all() and theirs.numel() >= 256:  # enough samples to compare the spread
                ratio = (ours.std() / theirs.std()).item()
                assert 0.8 < ratio < 1.25, f"{where}: std ratio {ratio:.3f}"
                gap = abs(_kurtosis(ours) - _kurtosis(theirs))  # uniform: -1.2, normal: 0
                assert gap < 0.7, f"{where}: excess kurtosis differs by {gap:.2f} (uniform vs normal?)"


def _kurtosis(x: torch.Tensor) -> float:
    z = (x - x.mean()) / x.std()
    return (z**4).mean().item() - 3.0


def test_llama2_7b_shape_on_meta_device_counts_like_peft() -> None:
    """Llama-2-7B's shape built on the meta device (no memory): default LoraConfig (q_proj, v_proj, r=8).

    PEFT 0.21.2 runs on the meta model too, so its line is computed, not copied; the literal is the
    well-known count for Llama-2-7B (32 layers x 2 modules x r=8 x (4096 + 4096)).
    """
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig())
    assert all(t.is_meta for e in fpm.adapter.values() for t in e.values())
    ours = capture_stdout(fpm.print_trainable_parameters)
    assert ours == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"
    theirs = capture_stdout(peft.get_peft_model(model, peft.LoraConfig()).print_trainable_parameters)
    assert ours == theirs


@pytest.mark.parametrize("inference_mode", [True, False])
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("llama", dict(target_modules=["q_proj", "v_proj"])),
        ("bert_seq_cls", dict(task_type="SEQ_CLS", target_modules=["query"], bias="all")),
    ],
)
def test_inference_mode_freezes_the_adapter_like_peft(name, kwargs, inference_mode):
    """PEFT: inference_mode=True creates the adapter frozen; counts follow requires_grad."""
    import copy as _copy

    import peft

    model = T.TINY_MODELS[name]()
    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(inference_mode=inference_mode, **kwargs))
    ref = peft.get_peft_model(_copy.deepcopy(model), peft.LoraConfig(inference_mode=inference_mode, **kwargs))
    assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    flags = {v.requires_grad for e in pm.adapter.values() for k, v in e.items() if k.startswith("lora_")}
    assert flags == {not inference_mode}


def test_revision_and_name_are_recorded_like_peft():
    """`revision` goes into the config; `base_model_name_or_path` comes from the model, as in PEFT."""
    import copy as _copy

    import peft

    model = T.tiny_llama()
    model.name_or_path = "org/tiny-llama"
    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(), revision="v1.2")
    ref = peft.get_peft_model(_copy.deepcopy(model), peft.LoraConfig(), revision="v1.2")
    ours, theirs = pm.peft_config["default"], ref.peft_config["default"]
    assert (ours.revision, ours.base_model_name_or_path) == (theirs.revision, theirs.base_model_name_or_path)
    assert ours.revision == "v1.2"
