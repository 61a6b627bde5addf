"""Issue 9: inputs funcpeft cannot handle get a clear, specific error instead of a silently wrong result.

Each test here failed (ran and returned something, or raised an unrelated error) before the fix.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import optree
import peft
import pytest
import torch
from helpers import MODELS
from torch import nn

import funcpeft
from funcpeft import testing as T


@pytest.fixture(scope="module")
def llama() -> tuple[Any, ...]:
    pm = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    fn, base, fresh = pm
    trees = [T.random_like(fresh, torch.Generator().manual_seed(s)) for s in range(2)]
    return pm, fn, base, trees


@pytest.fixture(scope="module")
def gpt2() -> tuple[Any, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = funcpeft.get_peft_model(T.tiny_gpt2(), funcpeft.LoraConfig(r=2, target_modules=["c_attn"]))
    fn, base, fresh = pm
    return pm, fn, base, [T.random_like(fresh, torch.Generator().manual_seed(s)) for s in range(2)]


def _ids(batch: int, length: int = 5) -> torch.Tensor:
    return torch.randint(1, T.VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


# -- 5: routing with the wrong number of choices ---------------------------------------------------------------
@pytest.mark.parametrize(
    "index", [[0, 1], [0], [0, 1, 0, 1, 0], [1, 0, 1]], ids=["2-of-4", "1-of-4", "5-of-4", "3-of-4"]
)
def test_per_example_index_must_have_one_entry_per_example(llama: tuple[Any, ...], index: list[int]) -> None:
    _, fn, base, trees = llama
    stacked = funcpeft.stack_adapters(trees)
    with pytest.raises(
        ValueError, match=rf"index has length {len(index)}, but the batch has 4 examples \(dim 0 of input_ids\)"
    ):
        fn(base, funcpeft.per_example(stacked, index), input_ids=_ids(4))


def test_gpt2_flattened_layers_cannot_hide_a_wrong_length(gpt2: tuple[Any, ...]) -> None:
    """GPT-2's Conv1D sees (B*L, H): a length-5 index for B=4, L=5 divides B*L and used to be accepted."""
    _, fn, base, trees = gpt2
    stacked = funcpeft.stack_adapters(trees)
    with pytest.raises(ValueError, match="index has length 5, but the batch has 4"):
        fn(base, funcpeft.per_example(stacked, [0, 1, 0, 1, 0]), input_ids=_ids(4, 5))


def test_index_none_needs_one_stacked_adapter_per_example(llama: tuple[Any, ...]) -> None:
    _, fn, base, trees = llama
    with pytest.raises(
        ValueError,
        match=r"without an index uses stacked adapter i for example i, but K = 2 adapters, but the batch has 4",
    ):
        fn(base, funcpeft.per_example(funcpeft.stack_adapters(trees)), input_ids=_ids(4))


def test_mixed_batch_needs_one_name_per_example(llama: tuple[Any, ...]) -> None:
    pm, fn, base, trees = llama
    with pytest.raises(ValueError, match="adapter_names has length 3, but the batch has 4"):
        fn(base, funcpeft.mixed_batch({"default": trees[0]}, ["default", "__base__", "default"]), input_ids=_ids(4))


def test_routing_length_is_checked_under_vmap_and_compile(llama: tuple[Any, ...]) -> None:
    _, fn, base, trees = llama
    stacked = funcpeft.stack_adapters(trees)
    routed = funcpeft.per_example(stacked, [0, 1, 0])
    batches = _ids(4).expand(2, 4, 5)
    with pytest.raises(ValueError, match="index has length 3, but the batch has 4"):
        torch.func.vmap(lambda ids: fn(base, routed, input_ids=ids).logits)(batches)
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids: fn(base, routed, input_ids=ids).logits, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="index has length 3, but the batch has 4"):
        compiled(_ids(4))
    good = funcpeft.per_example(stacked, [0, 1, 0, 1])  # and the right length still runs, equal to eager
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids: fn(base, good, input_ids=ids).logits, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(_ids(4)), fn(base, good, input_ids=_ids(4)).logits)


# -- 6: leaves are checked -----------------------------------------------------------------------------------------
def _with_leaf(tree: Any, path: str, name: str, value: Any) -> Any:
    out = {p: dict(e) for p, e in tree.items()}
    out[path][name] = value
    return out


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda t: t[Q]["lora_B"][:1], ValueError, rf"{Q}.lora_B has shape \(1, 2\), expected \(64, 2\)"),
        (lambda t: t[Q]["lora_A"].T, ValueError, rf"{Q}.lora_A has shape \(64, 2\), expected \(2, 64\)"),
        (lambda t: t[Q]["lora_A"].long(), TypeError, rf"{Q}.lora_A has dtype torch.int64, expected a floating-point"),
        (
            lambda t: torch.empty(2, 64, device="meta"),
            ValueError,
            rf"{Q}.lora_A is on device meta, but the layer's weight is on cpu",
        ),
        (lambda t: t[Q]["lora_A"].tolist(), TypeError, rf"{Q}.lora_A is a list, expected a Tensor of shape \(2, 64\)"),
    ],
    ids=["broadcastable-B", "transposed-A", "int64", "meta", "list"],
)
def test_wrong_leaves_are_named(llama: tuple[Any, ...], bad: Any, error: type, match: str) -> None:
    pm, fn, base, trees = llama
    name = "lora_B" if "lora_B" in match else "lora_A"
    tree = _with_leaf(trees[0], Q, name, bad(trees[0]))
    with pytest.raises(error, match=match):
        fn(base, tree, input_ids=_ids(2))
    with pytest.raises(error, match=match):  # merging is checked the same way
        funcpeft.merge(pm, base, tree)
    with pytest.raises(error, match=match):
        funcpeft.merge_and_unload(pm, tree)


def test_leaf_checks_see_through_vmap_and_routing(llama: tuple[Any, ...]) -> None:
    _, fn, base, trees = llama
    bad = _with_leaf(trees[0], Q, "lora_B", trees[0][Q]["lora_B"][:1])
    stacked = funcpeft.stack_adapters([bad, bad])
    ids = _ids(2)
    with pytest.raises(ValueError, match=r"lora_B has shape \(1, 2\), expected \(64, 2\)"):
        torch.func.vmap(lambda a: fn(base, a, input_ids=ids).logits)(stacked)
    with pytest.raises(ValueError, match=r"lora_B has shape \(2, 1, 2\), expected \(2, 64, 2\)"):
        fn(base, funcpeft.per_example(stacked, [0, 1]), input_ids=_ids(2))


# -- 8 / 9: swapped arguments, PEFT models, parametrized and quantised layers ----------------------------------
def test_swapped_base_and_adapter_say_so(llama: tuple[Any, ...]) -> None:
    _, fn, base, trees = llama
    with pytest.raises(TypeError, match="did you swap the arguments"):
        fn(trees[0], base, input_ids=_ids(2))


def test_incomplete_base_names_missing_parameters(llama: tuple[Any, ...]) -> None:
    _, fn, base, trees = llama
    partial = {k: v for k, v in base.items() if "embed_tokens" not in k}
    with pytest.raises(
        KeyError, match=r"base is missing 1 of the model's parameters, e.g. \['model.embed_tokens.weight'\]"
    ):
        fn(partial, trees[0], input_ids=_ids(2))


def test_a_peft_model_is_refused() -> None:
    model = T.tiny_llama()
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="PEFT-wrapped model"):
        funcpeft.get_peft_model(wrapped, funcpeft.LoraConfig(r=2, target_modules=["lora_A"]))
    with pytest.raises(TypeError, match="PEFT-wrapped model"):
        funcpeft.get_peft_model(
            wrapped.get_submodule("base_model.model"), funcpeft.LoraConfig(r=2, target_modules=["q_proj"])
        )


def test_repr_is_short(llama: tuple[Any, ...]) -> None:
    pm = llama[0]
    text = repr(pm)
    assert len(text) < 300 and "LlamaForCausalLM" in text and "4 adapted layers" in text, text


def test_weight_norm_layers_are_refused_by_name() -> None:
    model = MODELS["mlp"]()
    torch.nn.utils.parametrizations.weight_norm(model.get_submodule("lin0"))
    with pytest.raises(NotImplementedError, match=r"'lin0'.*parametrization \(\['_WeightNorm'\]"):
        funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["lin0"]))


class _Int8Linear(nn.Linear):
    """Stands in for a quantised layer: an nn.Linear subclass whose weight is not a float tensor."""

    def __init__(self) -> None:
        super().__init__(8, 4)
        self.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)


def test_quantised_layers_are_refused_by_name_and_type() -> None:
    model = nn.Sequential(_Int8Linear())
    with pytest.raises(
        NotImplementedError,
        match=r"'0'.*_Int8Linear\): its weight is a torch.nn.parameter.Parameter of dtype torch.int8",
    ):
        funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["0"]))


def test_bitsandbytes_4bit_layers_are_refused_by_name_and_type_where_unsupported() -> None:
    """LoRA / DoRA adapt bitsandbytes layers (tests/test_qlora.py); other methods are refused, naming the
    module, its type and the methods that can."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional extra (quantised bases, issue 14)")
    layer = bnb.nn.Linear4bit(8, 4, quant_type="nf4")
    layer.load_state_dict(nn.Linear(8, 4).state_dict())
    model = nn.Sequential(layer.to("cpu"))
    with pytest.raises(NotImplementedError, match=r"LoHaConfig \(loha\) on '0'.*bitsandbytes.*Linear4bit.*'lora'"):
        funcpeft.get_peft_model(model, funcpeft.LoHaConfig(r=2, target_modules=["0"]))
    funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["0"]))  # supported now


def test_checks_keep_the_right_trees_running(llama: tuple[Any, ...]) -> None:
    """The checks do not reject what is valid: grads, vmap, routing and bf16 adapters still run."""
    _, fn, base, trees = llama
    ids = _ids(2)
    loss, grads = funcpeft.value_and_grad(lambda a: fn(base, a, input_ids=ids).logits.sum())(trees[0])
    assert optree.tree_structure(grads) == optree.tree_structure(trees[0])
    half = optree.tree_map(lambda t: t.detach().to(torch.bfloat16), trees[0])
    fn(base, half, input_ids=ids)
    fn(base, funcpeft.per_example(funcpeft.stack_adapters(trees), [1, 0]), input_ids=ids)


# -- item 7: the adapter applies exactly where PEFT applies it ------------------------------------------------
class _SharedLinear(nn.Module):
    """One Linear registered under two names; only the first is targeted (PEFT wraps `a`, `b` stays plain)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x) + 2 * self.a(x)


class _ParentReadsWeight(nn.Module):
    """A parent that uses its child's weight directly: PEFT's LoRA layer hands it the plain base weight."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + torch.nn.functional.linear(x, self.proj.weight)


@pytest.mark.parametrize("build, target", [(_SharedLinear, "a"), (_ParentReadsWeight, "proj")])
@pytest.mark.parametrize("compiled", [False, True])
def test_adapter_applies_only_inside_the_targeted_modules_forward(build: Any, target: str, compiled: bool) -> None:
    torch.manual_seed(0)
    model, x = build(), torch.randn(3, 4)
    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=[target], init_lora_weights=False))
    fn, base, adapter = pm
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=[target], init_lora_weights=False))
    T.copy_into_peft(twin, adapter, pm.plans[pm.adapter_name])

    def loss_grad(a: Any) -> Any:
        return torch.func.grad(lambda a: fn(base, a, x).pow(2).sum())(a)

    call, grad = (torch.compile(fn, fullgraph=True), torch.compile(loss_grad)) if compiled else (fn, loss_grad)
    want = twin(x)
    assert not torch.equal(want, model(x))  # the adapter matters here
    if compiled and build is _SharedLinear:
        # a traced call would run the shared module object itself: dynamo runs this call eagerly (a graph break
        # whose reason fullgraph=True reports), which matches PEFT
        with pytest.raises(Exception, match="registered in the model under several names"):
            call(base, adapter, x)
        call = torch.compile(fn)
    torch.testing.assert_close(call(base, adapter, x), want, atol=1e-6, rtol=1e-6)
    want.pow(2).sum().backward()
    grads = grad(adapter)
    for path, leaves in T.peft_grads(twin, adapter, pm.plans[pm.adapter_name]).items():
        for name, g in leaves.items():
            torch.testing.assert_close(grads[path][name], g, atol=1e-6, rtol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is left as it was


def test_a_second_name_of_a_module_is_explained_when_targeted() -> None:
    with pytest.raises(peft.tuners.tuners_utils.NoMatchingPeftModuleError):  # PEFT refuses it too
        peft.get_peft_model(_SharedLinear(), peft.LoraConfig(target_modules=["b"]))
    with pytest.raises(ValueError, match="'b' is the module 'a' under a second name"):
        funcpeft.get_peft_model(_SharedLinear(), funcpeft.LoraConfig(target_modules=["b"]))
