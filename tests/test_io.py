"""PEFT's on-disk adapter format both ways: files compared key by key with PEFT's, logits after loading
across libraries, bitwise round trips, and the safety rules (no unpickling, one mismatch error, atomic writes)."""

from __future__ import annotations

import copy
import errno
import functools
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from helpers import MODELS, Pair, assert_unchanged, examples, hf, make_inputs, out_tensor, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import funcpeft
import funcpeft.io as fio
from funcpeft import testing as T

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-all-linear-rslora-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 16},
        ),
    ),
    "llama-embed-tokens": ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj"])),  # + base embedding
    "gpt2-conv1d-wte": ("gpt2", dict(r=4, target_modules=["c_attn", "wte"])),
    "bert-seq-cls-lora-only": (
        "bert",
        dict(
            task_type="SEQ_CLS",
            r=4,
            target_modules=["query", "value"],
            modules_to_save=["pooler.dense"],
            bias="lora_only",
        ),
    ),
    "bert-seq-cls-bias-all-nested": (
        "bert",
        dict(
            task_type="SEQ_CLS",
            r=4,
            target_modules=["query"],
            modules_to_save=["pooler"],
            bias="all",
        ),
    ),
}


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class Saved:
    """One Pair, saved by PEFT and by funcpeft into two directories."""

    def __init__(self, name: str, root: Path) -> None:
        kind, config = CASES[name]
        self.pair = Pair(kind, config)
        self.peft_dir, self.func_dir = root / "peft", root / "funcpeft"
        _quiet(self.pair.peft_model.save_pretrained, self.peft_dir)
        _quiet(self.pair.fpm.save_pretrained, self.func_dir, self.pair.adapter)

    def tensors(self, which: Path) -> dict[str, torch.Tensor]:
        return safetensors.torch.load_file(which / fio.WEIGHTS_NAME)

    def config(self, which: Path) -> dict[str, Any]:
        data = json.loads((which / fio.CONFIG_NAME).read_text())
        if isinstance(data["target_modules"], list):
            data["target_modules"] = sorted(data["target_modules"])
        return data

    def logits(self, fpm: funcpeft.FunctionalPeftModel) -> torch.Tensor:
        with torch.no_grad():
            return out_tensor(fpm.fn(fpm.base, fpm.adapter, **self.pair.inputs))


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(request.param, tmp_path_factory.mktemp(request.param))


def _detached(tree: Any) -> Any:
    return {p: {k: v.detach() for k, v in e.items()} for p, e in tree.items()}


# -- the files are PEFT's -------------------------------------------------------------------------------------
def test_weights_file_matches_peft(saved: Saved) -> None:
    want, got = saved.tensors(saved.peft_dir), saved.tensors(saved.func_dir)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    with safe_open(saved.peft_dir / fio.WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with safe_open(saved.func_dir / fio.WEIGHTS_NAME, "pt") as f:  # + the digest of the config saved with it
        canonical = json.dumps(
            json.loads((saved.func_dir / fio.CONFIG_NAME).read_text()), sort_keys=True, separators=(",", ":")
        )
        config_digest = hashlib.sha256(canonical.encode()).hexdigest()
        assert f.metadata() == {"format": "pt", fio.DIGEST_KEY: config_digest}


def test_config_file_matches_peft(saved: Saved) -> None:
    assert saved.config(saved.func_dir) == saved.config(saved.peft_dir)
    text = (saved.func_dir / fio.CONFIG_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
    assert json.loads(text)["inference_mode"] is True


def test_no_temporary_files_left(saved: Saved) -> None:
    assert sorted(os.listdir(saved.func_dir)) == [fio.CONFIG_NAME, fio.WEIGHTS_NAME]


def test_peft_checkpoint_loads_in_funcpeft(saved: Saved) -> None:
    snap = snapshot(saved.pair.model)
    fpm = funcpeft.from_pretrained(saved.pair.model, saved.peft_dir)
    with torch.no_grad():
        want = out_tensor(saved.pair.peft_model(**saved.pair.inputs))
    assert (saved.logits(fpm) - want).abs().max().item() <= 1e-5
    T.assert_trees_close(fpm.adapter, _detached(saved.pair.adapter), atol=0)
    assert_unchanged(saved.pair.model, snap)


def test_funcpeft_checkpoint_loads_in_peft(saved: Saved) -> None:
    loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(saved.pair.model), saved.func_dir)
    with torch.no_grad():
        got = out_tensor(loaded(**saved.pair.inputs))
        want = out_tensor(saved.pair.fn(saved.pair.base, saved.pair.adapter, **saved.pair.inputs))
    assert (got - want).abs().max().item() <= 1e-5
    named = dict(loaded.named_parameters())
    for path, entry in saved.pair.adapter.items():
        for key, value in entry.items():
            assert torch.equal(named[T.peft_param_name(path, key, saved.pair.plan[path])], value.detach())


def _peft_config_dict(config: Any) -> dict[str, Any]:
    out = {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in config.to_dict().items()}
    out.pop("runtime_config", None)
    return out


def test_loaded_config_matches_peft(saved: Saved) -> None:
    for trainable in (False, True):
        pm = _quiet(
            peft.PeftModel.from_pretrained, copy.deepcopy(saved.pair.model), saved.func_dir, is_trainable=trainable
        )
        fpm = funcpeft.from_pretrained(saved.pair.model, saved.func_dir, is_trainable=trainable)
        assert _peft_config_dict(fpm.peft_config["default"]) == _peft_config_dict(pm.peft_config["default"])


def test_load_adapter_without_model_reads_the_tree(saved: Saved) -> None:
    for d in (saved.peft_dir, saved.func_dir):
        tree, config = funcpeft.load_adapter(d)
        T.assert_trees_close(tree, _detached(saved.pair.adapter), atol=0)
        assert config.to_dict() == saved.config(d)


def test_non_default_adapter_name_goes_to_a_subdirectory(tmp_path: Path) -> None:
    kind, config = CASES["bert-seq-cls-bias-all-nested"]  # PEFT keeps the adapter name in one key here
    model = MODELS[kind]()
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**config), adapter_name="second")
    adapter = T.random_like(fpm.adapter, torch.Generator().manual_seed(3))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config), adapter_name="second")
    T.copy_into_peft(pm, adapter, fpm.plans["second"], "second")
    _quiet(pm.save_pretrained, tmp_path / "peft")
    fpm.save_pretrained(tmp_path / "funcpeft", adapter)
    assert os.listdir(tmp_path / "funcpeft") == ["second"]
    want = safetensors.torch.load_file(tmp_path / "peft" / "second" / fio.WEIGHTS_NAME)
    got = safetensors.torch.load_file(tmp_path / "funcpeft" / "second" / fio.WEIGHTS_NAME)
    assert any(".modules_to_save.second." in k for k in want)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    back = funcpeft.from_pretrained(model, tmp_path / "funcpeft", adapter_name="second")
    assert back.adapter_name == "second"
    T.assert_trees_close(back.adapter, _detached(adapter), atol=0)


# -- round trips -----------------------------------------------------------------------------------------------
ROUND_TRIP_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj", "down_proj"], rank_pattern={"down_proj": 2})),
    ("llama", dict(r=2, target_modules="all-linear", use_rslora=True, lora_alpha=5)),
    ("bert", dict(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], bias="all")),
    ("gpt2", dict(r=2, target_modules=["c_attn", "wte"], bias="lora_only")),
]


@functools.cache
def _model(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    return MODELS[kind]().to(dtype)  # funcpeft never modifies it, so one copy serves every example


@settings(max_examples=examples(14))
@given(
    case=st.sampled_from(range(len(ROUND_TRIP_CONFIGS))),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    autocast=st.booleans(),
    trainable=st.booleans(),
)
def test_round_trip_is_bitwise_exact(case: int, dtype: torch.dtype, autocast: bool, trainable: bool) -> None:
    kind, config = ROUND_TRIP_CONFIGS[case]
    model = _model(kind, dtype)
    fpm = _quiet(funcpeft.get_peft_model, model, funcpeft.LoraConfig(**config), autocast_adapter_dtype=autocast)
    adapter = T.random_like(fpm.adapter, torch.Generator().manual_seed(case))
    with tempfile.TemporaryDirectory() as d:
        _quiet(fpm.save_pretrained, d, adapter)
        back = funcpeft.from_pretrained(model, d, is_trainable=trainable, autocast_adapter_dtype=autocast)
        bare, _ = funcpeft.load_adapter(d)
    for tree in (back.adapter, bare):
        assert tree.keys() == adapter.keys()
        for path, entry in adapter.items():
            assert tree[path].keys() == entry.keys()
            for k, v in entry.items():
                assert tree[path][k].dtype == v.dtype and torch.equal(tree[path][k], v.detach()), (path, k)
    in_place = {(p, n) for p, e in back.plans["default"].items() for n in e.in_place}
    assert all(
        t.requires_grad == (trainable or (p, n) in in_place) for p, e in back.adapter.items() for n, t in e.items()
    )
    auto_mapping = (
        None
        if config.get("task_type")
        else {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    )
    want_config = {
        **fpm.peft_config["default"].to_dict(),
        "inference_mode": not trainable,
        "auto_mapping": auto_mapping,
    }
    got_config = back.peft_config["default"].to_dict()
    for c in (want_config, got_config):  # PEFT's task classes append their heads again on load: compared below
        c["modules_to_save"] = c["modules_to_save"] and sorted(set(c["modules_to_save"]))
    assert got_config == want_config


def test_dtypes_and_requires_grad_follow_peft(tmp_path: Path) -> None:
    model = MODELS["bert"]().to(torch.bfloat16)
    config: dict[str, Any] = dict(task_type="SEQ_CLS", r=2, target_modules=["query"], bias="lora_only")
    _quiet(peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config)).save_pretrained, tmp_path)
    plan = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**config)).plans["default"]
    for autocast in (True, False):
        for trainable in (True, False):
            pm = _quiet(
                peft.PeftModel.from_pretrained,
                copy.deepcopy(model),
                tmp_path,
                is_trainable=trainable,
                autocast_adapter_dtype=autocast,
            )
            named = dict(pm.named_parameters())
            fpm = funcpeft.from_pretrained(model, tmp_path, is_trainable=trainable, autocast_adapter_dtype=autocast)
            for path, entry in fpm.adapter.items():
                for key, leaf in entry.items():
                    want = named[T.peft_param_name(path, key, plan[path])]
                    assert (leaf.dtype, leaf.requires_grad) == (want.dtype, want.requires_grad), (path, key, autocast)
            assert fpm.peft_config["default"].inference_mode == pm.peft_config["default"].inference_mode


def test_saved_embedding_weight_is_used_like_peft(tmp_path: Path) -> None:
    """PEFT saves the targeted embedding's base weight and loading writes it into the model: funcpeft puts it in `base`."""
    pair = Pair(*CASES["llama-embed-tokens"])
    with torch.no_grad():
        pair.peft_model.get_parameter("base_model.model.model.embed_tokens.base_layer.weight").mul_(1.5)
    _quiet(pair.peft_model.save_pretrained, tmp_path)
    snap = snapshot(pair.model)
    fpm = funcpeft.from_pretrained(pair.model, tmp_path)
    peft_loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(pair.model), tmp_path)
    with torch.no_grad():
        want = out_tensor(peft_loaded(**pair.inputs))
        got = out_tensor(fpm.fn(fpm.base, fpm.adapter, **pair.inputs))
    assert (got - want).abs().max().item() <= 1e-5
    assert not torch.equal(fpm.base["model.embed_tokens.weight"], pair.model.get_parameter("model.embed_tokens.weight"))
    assert_unchanged(pair.model, snap)
    with pytest.warns(UserWarning, match="base-model weights that differ"):
        funcpeft.load_adapter(tmp_path, model=pair.model)


def test_resized_vocabulary_saves_embeddings_like_peft(tmp_path: Path) -> None:
    """PEFT's other save_embedding_layers="auto" trigger: vocab_size differs from the base model's config.json."""
    from transformers import AutoModelForCausalLM

    hf(MODELS["llama"]()).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model.resize_token_embeddings(T.VOCAB + 8)
    config: dict[str, Any] = dict(r=4, target_modules=["q_proj"])
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**config))
    adapter = T.random_like(fpm.adapter, torch.Generator().manual_seed(5))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    _quiet(pm.save_pretrained, tmp_path / "peft")
    with pytest.warns(UserWarning, match="resized during finetuning"):
        fpm.save_pretrained(tmp_path / "funcpeft", adapter)
    want = safetensors.torch.load_file(tmp_path / "peft" / fio.WEIGHTS_NAME)
    got = safetensors.torch.load_file(tmp_path / "funcpeft" / fio.WEIGHTS_NAME)
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(want)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    back = funcpeft.from_pretrained(model, tmp_path / "funcpeft")
    embedding = back.base["model.embed_tokens.weight"]
    assert embedding.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # equal to the model's: not copied
    with pytest.raises(funcpeft.AdapterMismatchError, match=r"embed_tokens\.weight: checkpoint \[136, 64\]"):
        funcpeft.from_pretrained(MODELS["llama"](), tmp_path / "funcpeft")  # the original vocabulary


# -- safety ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pair, Path]:
    pair = Pair("llama", dict(r=4, target_modules=["q_proj", "v_proj"]))
    d = tmp_path_factory.mktemp("llama")
    pair.fpm.save_pretrained(d, pair.adapter)
    return pair, d


@pytest.fixture(scope="module")
def peft_llama_dir(llama_dir: tuple[Pair, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Pair, Path]:
    """The same adapter saved by PEFT: files from elsewhere, whose config may have been edited."""
    pair, _ = llama_dir
    d = tmp_path_factory.mktemp("peft-llama")
    _quiet(pair.peft_model.save_pretrained, d)
    return pair, d


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


class _Marker:
    """Unpickling this creates a file: proof that a pickle was executed."""

    path = ""

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_pickle_is_never_unpickled_and_the_error_says_how_to_convert(
    llama_dir: tuple[Pair, Path], tmp_path: Path
) -> None:
    pair, src = llama_dir
    evil = _copy_dir(src, tmp_path / "evil")
    os.remove(evil / fio.WEIGHTS_NAME)
    marker = tmp_path / "pwned"
    _Marker.path = str(marker)
    (evil / fio.PICKLE_NAME).write_bytes(pickle.dumps({"x": _Marker()}))
    for load in (lambda: funcpeft.load_adapter(evil), lambda: funcpeft.from_pretrained(pair.model, evil)):
        with pytest.raises(ValueError, match=r"weights_only=True[\s\S]*safetensors\.torch\.save_file"):
            load()
    with pytest.raises(pickle.UnpicklingError):  # opting in still uses torch.load(weights_only=True)
        funcpeft.load_adapter(evil, allow_pickle=True)
    assert not marker.exists()

    # a genuine PEFT .bin: the conversion snippet from the error message works, then it loads
    real = tmp_path / "real"
    _quiet(pair.peft_model.save_pretrained, real, safe_serialization=False)
    assert sorted(os.listdir(real)) == ["README.md", fio.CONFIG_NAME, fio.PICKLE_NAME]
    with pytest.raises(ValueError) as info:
        funcpeft.from_pretrained(pair.model, real)
    snippet = "\n".join(line[4:] for line in str(info.value).splitlines() if line.startswith("    "))
    exec(snippet, {})
    fpm = funcpeft.from_pretrained(pair.model, real)
    T.assert_trees_close(fpm.adapter, _detached(pair.adapter), atol=0)


def test_unknown_config_keys_warn_and_are_ignored(peft_llama_dir: tuple[Pair, Path], tmp_path: Path) -> None:
    pair, src = peft_llama_dir
    d = _copy_dir(src, tmp_path / "future")
    data = json.loads((d / fio.CONFIG_NAME).read_text())
    (d / fio.CONFIG_NAME).write_text(json.dumps({**data, "a_future_option": 3, "another_one": None}))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['a_future_option', 'another_one'\]"):
        fpm = funcpeft.from_pretrained(pair.model, d)
    T.assert_trees_close(fpm.adapter, _detached(pair.adapter), atol=0)


@pytest.mark.parametrize("peft_type, match", [("FUTURE_TYPE", "FUTURE_TYPE"), (None, "peft_type")])
def test_unsupported_or_missing_peft_type_is_a_clear_error(
    peft_llama_dir: tuple[Pair, Path], tmp_path: Path, peft_type: str | None, match: str
) -> None:
    pair, src = peft_llama_dir
    d = _copy_dir(src, tmp_path / "other")
    data = json.loads((d / fio.CONFIG_NAME).read_text())
    data.pop("peft_type")
    if peft_type:
        data["peft_type"] = peft_type
    (d / fio.CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises((NotImplementedError, ValueError), match=match):
        funcpeft.from_pretrained(pair.model, d)


def test_all_checkpoint_problems_are_reported_in_one_error(llama_dir: tuple[Pair, Path], tmp_path: Path) -> None:
    pair, src = llama_dir
    d = _copy_dir(src, tmp_path / "broken")
    state = safetensors.torch.load_file(d / fio.WEIGHTS_NAME)
    prefix = "base_model.model.model.layers."
    missing = f"{prefix}0.self_attn.q_proj.lora_A.weight"
    unexpected = f"{prefix}0.self_attn.q_proj.lora_C.weight"
    reshaped = f"{prefix}1.self_attn.v_proj.lora_B.weight"
    state[unexpected] = state.pop(missing)
    state[reshaped] = torch.zeros(3, 3)
    safetensors.torch.save_file(state, d / fio.WEIGHTS_NAME, metadata={"format": "pt"})
    for load in (
        lambda **kw: funcpeft.from_pretrained(pair.model, d, **kw),
        lambda **kw: funcpeft.load_adapter(d, model=pair.model, **kw),
    ):
        with pytest.raises(funcpeft.AdapterMismatchError) as info:
            load()
        msg = str(info.value)
        assert all(k in msg for k in (missing, unexpected, reshaped)), msg
        assert "[3, 3]" in msg and "model expects [32, 4]" in msg
        with pytest.warns(UserWarning, match=re.escape(missing)):
            out = load(strict=False)
        tree = out.adapter if isinstance(out, funcpeft.FunctionalPeftModel) else out[0]
        assert tree["model.layers.1.self_attn.v_proj"]["lora_B"].shape == (32, 4)
        kept = "model.layers.1.self_attn.q_proj"
        assert torch.equal(tree[kept]["lora_A"], pair.adapter[kept]["lora_A"].detach())


def test_a_tree_that_does_not_fit_the_model_is_not_saved(llama_dir: tuple[Pair, Path], tmp_path: Path) -> None:
    pair, _ = llama_dir
    stacked = funcpeft.stack_adapters([pair.adapter, pair.adapter])
    with pytest.raises(funcpeft.AdapterMismatchError, match=r"shape mismatch[\s\S]*checkpoint \[2, 4, 64\]"):
        pair.fpm.save_pretrained(tmp_path / "out", stacked)
    assert not (tmp_path / "out").exists()


def _listing(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _half_written_save_file(exc: BaseException) -> Any:
    def fake(tensors: Any, filename: Any, metadata: Any = None) -> None:
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise exc

    return fake


@pytest.mark.parametrize("failure", ["serialise-error", "weights-disk-full", "config-disk-full"])
def test_failed_save_keeps_the_previous_adapter(
    llama_dir: tuple[Pair, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    pair, _ = llama_dir
    d = tmp_path / "adapter"
    pair.fpm.save_pretrained(d, pair.adapter)
    pair.fpm.save_pretrained(
        d / "x", pair.adapter
    )  # a fresh directory inside, to check a failure there is cleaned up too
    before = _listing(d)
    new = T.random_like(pair.adapter, torch.Generator().manual_seed(9))
    if failure == "serialise-error":
        monkeypatch.setattr(fio, "save_file", _half_written_save_file(RuntimeError("injected")))
        expected: type[BaseException] = RuntimeError
    elif failure == "weights-disk-full":
        monkeypatch.setattr(fio, "save_file", _half_written_save_file(OSError(errno.ENOSPC, "No space left on device")))
        expected = OSError
    else:
        real_open = open

        def full_disk_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if str(path).endswith(".tmp") and fio.CONFIG_NAME in str(path):
                real_open(path, mode, *args, **kwargs).close()  # the temp file exists, then the write fails
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", full_disk_open)
        expected = OSError
    with pytest.raises(expected):
        pair.fpm.save_pretrained(d, new)
    with pytest.raises(expected):
        pair.fpm.save_pretrained(d / "y" / "z", new)
    monkeypatch.undo()
    assert _listing(d) == before  # old files byte-identical, no temp files, no half-created directories
    T.assert_trees_close(funcpeft.load_adapter(d)[0], _detached(pair.adapter), atol=0)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "a\\b", "", "."])
def test_adapter_names_with_path_parts_are_rejected(llama_dir: tuple[Pair, Path], tmp_path: Path, name: str) -> None:
    pair, src = llama_dir
    d = tmp_path / "inner"
    with pytest.raises(ValueError, match="adapter_name"):
        funcpeft.save_adapter(d, pair.adapter, pair.fpm.peft_config["default"], name)
    with pytest.raises(ValueError, match="adapter_name"):
        funcpeft.load_adapter(src, name)
    with pytest.raises(ValueError, match="adapter_name"):
        funcpeft.from_pretrained(pair.model, src, name)
    assert os.listdir(tmp_path) == []


def test_pickle_output_is_refused(llama_dir: tuple[Pair, Path], tmp_path: Path) -> None:
    pair, _ = llama_dir
    with pytest.raises(ValueError, match="safetensors only"):
        pair.fpm.save_pretrained(tmp_path / "out", pair.adapter, safe_serialization=False)
    assert not (tmp_path / "out").exists()


# -- the adapter tree is required --------------------------------------------------------------------------------
def test_save_pretrained_without_the_tree_is_a_type_error(llama_dir: tuple[Pair, Path], tmp_path: Path) -> None:
    pair, _ = llama_dir
    with pytest.raises(TypeError, match=r"pass the trained tree[\s\S]*pm\.adapter"):
        pair.fpm.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- VeRA's shared projections ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vera() -> tuple[torch.nn.Module, funcpeft.FunctionalPeftModel, dict]:
    from funcpeft.configs import VeraConfig

    model = MODELS["llama"]()
    fpm = funcpeft.get_peft_model(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    return model, fpm, T.random_like(fpm.adapter, torch.Generator().manual_seed(4))


def test_vera_save_without_its_projections_is_refused_before_writing(vera: Any, tmp_path: Path) -> None:
    model, fpm, adapter = vera
    config = fpm.peft_config["default"]
    for kwargs in ({}, {"model": model}):  # the model's parameters do not hold the shared projections either
        with pytest.raises(ValueError, match=r"save_projection=True[\s\S]*base_model\.vera_A[\s\S]*base_params="):
            funcpeft.save_adapter(tmp_path / "out", adapter, config, **kwargs)
        assert not (tmp_path / "out").exists()
    funcpeft.save_adapter(tmp_path / "out", adapter, config, model=model, base_params=fpm.base)
    saved = safetensors.torch.load_file(tmp_path / "out" / fio.WEIGHTS_NAME)
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(saved)
    loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), tmp_path / "out")
    inputs = make_inputs("llama")
    with torch.no_grad():
        want = out_tensor(fpm.fn(fpm.base, adapter, **inputs))
        assert (out_tensor(loaded(**inputs)) - want).abs().max().item() <= 1e-5


# -- which adapter a name selects ---------------------------------------------------------------------------------
def test_a_named_adapter_is_read_from_its_subdirectory(llama_dir: tuple[Pair, Path], tmp_path: Path) -> None:
    pair, _ = llama_dir
    other = T.random_like(pair.adapter, torch.Generator().manual_seed(11))
    pair.fpm.save_pretrained(tmp_path, pair.adapter)  # "default" at the root ...
    funcpeft.save_adapter(
        tmp_path, other, pair.fpm.peft_config["default"], "other", model=pair.model
    )  # ... "other" below
    for load in (
        lambda **kw: funcpeft.load_adapter(tmp_path, **kw)[0],
        lambda **kw: funcpeft.load_adapter(tmp_path, model=pair.model, **kw)[0],
        lambda **kw: funcpeft.from_pretrained(pair.model, tmp_path, **kw).adapter,
    ):
        T.assert_trees_close(load(), _detached(pair.adapter), atol=0)
        T.assert_trees_close(load(adapter_name="other"), _detached(other), atol=0)


def test_a_named_adapter_that_is_not_there_lists_what_is(llama_dir: tuple[Pair, Path], tmp_path: Path) -> None:
    pair, src = llama_dir
    root = _copy_dir(src, tmp_path / "root")
    funcpeft.save_adapter(root, pair.adapter, pair.fpm.peft_config["default"], "second", model=pair.model)
    with_and_without_model: list[dict[str, Any]] = [{}, {"model": pair.model}]
    for kwargs in with_and_without_model:
        with pytest.raises(FileNotFoundError) as info:
            funcpeft.load_adapter(root, "third", **kwargs)
        msg = str(info.value)
        assert "'third'" in msg and "'default'" in msg and "'second'" in msg and str(root) in msg, msg
    only_sub = tmp_path / "only-sub"
    funcpeft.save_adapter(only_sub, pair.adapter, pair.fpm.peft_config["default"], "second", model=pair.model)
    with pytest.raises(FileNotFoundError, match=r"subdirectories: \['second'\]"):
        funcpeft.load_adapter(only_sub)


def test_from_pretrained_names_a_root_adapter_like_peft(peft_llama_dir: tuple[Pair, Path]) -> None:
    """PEFT's `from_pretrained(model, path, adapter_name=x)` loads the adapter in `path` and calls it x."""
    pair, d = peft_llama_dir
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(pair.model), d, adapter_name="mine")
    ours = funcpeft.from_pretrained(pair.model, d, adapter_name="mine")
    assert ours.adapter_name == "mine" and set(theirs.peft_config) == {"mine"}
    named = dict(theirs.named_parameters())
    for path, entry in ours.adapter.items():
        for key, value in entry.items():
            assert torch.equal(named[T.peft_param_name(path, key, ours.plans["mine"][path], "mine")], value), (
                path,
                key,
            )


# -- sizes from the config, checked before allocating ---------------------------------------------------------------
class _NoLargeAllocations(TorchDispatchMode):
    """Fails any op that would create a tensor over `limit` bytes, before it allocates."""

    def __init__(self, limit: int = 100 * 2**20) -> None:
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        size = args[0] if args and isinstance(args[0], (list, tuple, torch.Size)) else None
        if size is not None and all(isinstance(n, int) for n in size) and str(kwargs.get("device")) != "meta":
            numel = functools.reduce(lambda a, b: a * b, size, 1)
            assert numel * 4 <= self.limit, f"{func} would allocate {numel * 4 / 2**30:.1f} GiB"
        return func(*args, **kwargs)


def _edit_config(d: Path, **changes: Any) -> None:
    path = d / fio.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


@pytest.mark.parametrize("strict", [True, False])
def test_a_config_rank_that_contradicts_the_checkpoint_fails_before_allocating(
    peft_llama_dir: tuple[Pair, Path], tmp_path: Path, strict: bool
) -> None:
    pair, src = peft_llama_dir
    d = _copy_dir(src, tmp_path / "huge")
    _edit_config(d, r=2**24)
    with _NoLargeAllocations(), pytest.raises(ValueError) as info:
        funcpeft.from_pretrained(pair.model, d, strict=strict)
    msg = str(info.value)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert str(d / fio.CONFIG_NAME) in msg and "`r` = 16777216" in msg and key in msg, msg
    assert "[16777216, 64]" in msg and "[4, 64]" in msg, msg
    _edit_config(d, r=4, rank_pattern={"v_proj": 8})  # a smaller contradiction, through rank_pattern
    with pytest.raises(
        ValueError, match=r"`rank_pattern\['v_proj'\]` = 8 .*v_proj\.lora_A\.weight \[8, 64\].*\[4, 64\]"
    ):
        funcpeft.load_adapter(d, model=pair.model, strict=strict)


def test_a_config_rank_beyond_any_use_fails_before_allocating(
    peft_llama_dir: tuple[Pair, Path], tmp_path: Path
) -> None:
    """Nothing in the checkpoint to compare with (strict=False would init it fresh): the sane limit catches it."""
    pair, src = peft_llama_dir
    d = _copy_dir(src, tmp_path / "huge")
    _edit_config(d, r=2**24, target_modules=["k_proj"])  # k_proj has no tensors in the file
    with _NoLargeAllocations(), pytest.raises(ValueError) as info:
        funcpeft.from_pretrained(pair.model, d, strict=False)
    msg = str(info.value)
    assert "`r` = 16777216" in msg and "k_proj" in msg and "4096 = max(4 * min(in, out), 4096)" in msg, msg
    assert "[16777216, 64]" in msg, msg


def test_a_large_rank_the_checkpoint_holds_loads(tmp_path: Path) -> None:
    """The limit only guards fresh inits: whatever funcpeft saves, it loads back."""
    model = MODELS["llama"]()
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=5000, target_modules=["q_proj"]))
    assert 5000 > max(4 * 64, 4096)
    adapter = T.random_like(fpm.adapter, torch.Generator().manual_seed(2))
    fpm.save_pretrained(tmp_path, adapter)
    T.assert_trees_close(funcpeft.from_pretrained(model, tmp_path).adapter, _detached(adapter), atol=0)


def test_a_vera_rank_beyond_any_use_fails_before_the_shared_projections(vera: Any, tmp_path: Path) -> None:
    model, fpm, adapter = vera
    fpm.save_pretrained(tmp_path, adapter)
    path = tmp_path / fio.CONFIG_NAME
    data = json.loads(path.read_text())
    data["r"] = 2**24
    path.write_text(json.dumps(data))
    import safetensors.torch as st  # an edited config: drop the digest as the InterruptedSaveError message says

    st.save_file(st.load_file(tmp_path / fio.WEIGHTS_NAME), tmp_path / fio.WEIGHTS_NAME, metadata={"format": "pt"})
    for strict in (True, False):
        with (
            _NoLargeAllocations(),
            pytest.raises(ValueError, match=r"`r` = 16777216 .*vera_lambda_d \[16777216\].*\[8\]"),
        ):
            funcpeft.from_pretrained(model, tmp_path, strict=strict)


# -- unreadable files are named -------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["funcpeft", "peft"])
def test_weights_path_that_is_a_directory(
    llama_dir: tuple[Pair, Path], peft_llama_dir: tuple[Pair, Path], tmp_path: Path, which: str
) -> None:
    pair, src = llama_dir if which == "funcpeft" else peft_llama_dir
    d = _copy_dir(src, tmp_path / "d")
    os.remove(d / fio.WEIGHTS_NAME)
    os.mkdir(d / fio.WEIGHTS_NAME)
    for load in (lambda: funcpeft.load_adapter(d), lambda: funcpeft.from_pretrained(pair.model, d)):
        with pytest.raises(ValueError, match=re.escape(f"{d / fio.WEIGHTS_NAME} is a directory")):
            load()


def test_config_path_that_is_a_directory(peft_llama_dir: tuple[Pair, Path], tmp_path: Path) -> None:
    pair, src = peft_llama_dir
    d = _copy_dir(src, tmp_path / "d")
    os.remove(d / fio.CONFIG_NAME)
    os.mkdir(d / fio.CONFIG_NAME)
    with pytest.raises(ValueError, match=re.escape(f"{d / fio.CONFIG_NAME} is a directory")):
        funcpeft.from_pretrained(pair.model, d)


@pytest.mark.parametrize("which", ["funcpeft", "peft"])
@pytest.mark.parametrize("damage", ["truncated", "header-cut", "garbage", "empty"])
def test_corrupt_weights_are_named(
    llama_dir: tuple[Pair, Path], peft_llama_dir: tuple[Pair, Path], tmp_path: Path, which: str, damage: str
) -> None:
    pair, src = llama_dir if which == "funcpeft" else peft_llama_dir
    d = _copy_dir(src, tmp_path / "d")
    path = d / fio.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "header-cut": data[:40],
            "garbage": b"not safetensors " * 9,
            "empty": b"",
        }[damage]
    )
    for load in (lambda: funcpeft.load_adapter(d), lambda: funcpeft.from_pretrained(pair.model, d)):
        with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable safetensors file")):
            load()
