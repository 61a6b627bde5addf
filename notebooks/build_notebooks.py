"""Write the notebooks of this folder from the cell sources below (the .ipynb files are generated: edit here).

    .venv/bin/python notebooks/build_notebooks.py          # rewrite the three .ipynb files, without outputs
    .venv/bin/python notebooks/build_notebooks.py --check  # exit 1 if a committed .ipynb is out of date

tests/test_notebooks.py executes every notebook (on tiny models, in seconds) and checks they are up to date.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip())


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip())


QUIET = code("""
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets: harmless
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from transformers' internals
""")  # the first code cell of every notebook

QUICKSTART = [
    md("""
    # funcpeft quickstart

    funcpeft gives you HuggingFace PEFT's adapters as **pure functions**: `get_peft_model` returns
    `(fn, base, adapter)`, where `base` is the frozen weights, `adapter` a plain dict of trainable tensors and
    `fn(base, adapter, **inputs)` the model's forward with the adapter applied. The model is never modified.

    This notebook uses a tiny random Llama (`funcpeft.testing.tiny_llama`) so that it runs in seconds on a
    CPU; any transformers model works the same way (e.g. `AutoModelForCausalLM.from_pretrained(...)`).
    """),
    QUIET,
    code("""
    import copy
    import tempfile
    from pathlib import Path

    import torch

    import funcpeft
    from funcpeft import testing

    torch.manual_seed(0)
    model = testing.tiny_llama()  # LlamaForCausalLM: hidden size 64, 2 layers, vocabulary of 128 tokens
    ids = torch.randint(1, testing.VOCAB, (2, 12))  # a batch of 2 sequences of 12 tokens
    """),
    md("""
    ## 1. `get_peft_model`: PEFT's arguments in, `(fn, base, adapter)` out
    `adapter` is `{module path: {"lora_A": (r, in), "lora_B": (out, r)}}`: any pytree tool works on it.
    """),
    code("""
    config = funcpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")  # every linear layer but lm_head
    pm = funcpeft.get_peft_model(model, config)
    fn, base, adapter = pm
    pm.print_trainable_parameters()  # the same line (and numbers) as PEFT's
    for path, leaves in list(adapter.items())[:2]:
        print(path, {name: tuple(t.shape) for name, t in leaves.items()})
    """),
    md("""
    `fn` is pure: same inputs, same output, nothing mutated. A fresh LoRA adapter has `lora_B = 0`, so it
    starts as a no-op, and the model itself still has its plain `nn.Linear` layers.
    """),
    code("""
    out = fn(base, adapter, input_ids=ids)
    assert torch.equal(out.logits, model(input_ids=ids).logits)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    print(out.logits.shape)
    """),
    md("""
    ## 2. Gradients with respect to the adapter
    `funcpeft.value_and_grad` returns `(loss, grads)` with `grads` shaped like the adapter tree; at top level
    it uses `torch.autograd.grad` (PEFT's memory use). `torch.func.grad` gives the same numbers.
    """),
    code("""
    def loss_fn(adapter, ids):
        return fn(base, adapter, input_ids=ids, labels=ids).loss

    loss, grads = funcpeft.value_and_grad(loss_fn)(adapter, ids)
    testing.assert_trees_close(grads, torch.func.grad(loss_fn)(adapter, ids))
    print(f"loss {loss:.4f}, |grad lora_B| in layer 0: {grads['model.layers.0.self_attn.q_proj']['lora_B'].norm():.3e}")
    """),
    md("""
    ## 3. Train
    `funcpeft.optim` has pure optimisers (`init`, `update`, `apply_updates`): the new adapter is a new tree.
    (`torch.optim` works too: the leaves are ordinary tensors.) Here the adapter memorises the batch.
    """),
    code("""
    opt = funcpeft.optim.adamw(1e-2, weight_decay=0.0)
    state = opt.init(adapter)
    losses = []
    for _ in range(30):
        loss, grads = funcpeft.value_and_grad(loss_fn)(adapter, ids)
        updates, state = opt.update(grads, state, adapter)
        adapter = funcpeft.optim.apply_updates(adapter, updates)
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.7
    """),
    md("""
    ## 4. Save and load, in PEFT's format
    `save_pretrained` writes `adapter_config.json` and `adapter_model.safetensors` exactly as PEFT does.
    `funcpeft.load_adapter` reads them back as `(tree, config)`; `funcpeft.from_pretrained` is PEFT's
    `PeftModel.from_pretrained`: it checks every tensor against the model and returns `(fn, base, adapter)`.
    """),
    code("""
    workdir = Path(tempfile.mkdtemp())
    pm.save_pretrained(workdir / "my-adapter", adapter)
    print(sorted(p.name for p in (workdir / "my-adapter").iterdir()))

    tree, saved_config = funcpeft.load_adapter(workdir / "my-adapter")
    testing.assert_trees_close(tree, adapter, atol=0)
    fn2, base2, adapter2 = funcpeft.from_pretrained(model, workdir / "my-adapter")
    assert torch.equal(fn2(base2, adapter2, input_ids=ids).logits, fn(base, adapter, input_ids=ids).logits)
    print(f"r={saved_config.r}, {len(saved_config.target_modules)} target modules")
    """),
    md("""
    ## 5. PEFT interop, both ways
    PEFT loads funcpeft's files, and funcpeft loads PEFT's: same outputs.
    """),
    code("""
    import peft

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), workdir / "my-adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, fn(base, adapter, input_ids=ids).logits)

    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    peft_model.save_pretrained(workdir / "from-peft")
    fn3, base3, adapter3 = funcpeft.from_pretrained(model, workdir / "from-peft")
    with torch.no_grad():
        torch.testing.assert_close(fn3(base3, adapter3, input_ids=ids).logits, peft_model(input_ids=ids).logits)
    print("funcpeft -> PEFT and PEFT -> funcpeft: same outputs")
    """),
    md("""
    ## 6. Merge for deployment
    `merge_and_unload` returns a **new** plain model with `W + scale * B @ A` (the original stays as it was).
    """),
    code("""
    merged = funcpeft.merge_and_unload(pm, adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, fn(base, adapter, input_ids=ids).logits)
    assert torch.equal(model(input_ids=ids).logits, out.logits)  # the original model is unchanged
    print(type(merged).__name__)
    """),
    md("""
    Next: `02_ensembles.ipynb` (many adapters at once), `03_property_testing.ipynb` (testing your own code
    with funcpeft's hypothesis strategies), and `docs/usage.md` (the PEFT -> funcpeft table).
    """),
]

ENSEMBLES = [
    md("""
    # Many adapters at once: ensembles with `vmap`, and per-example adapters

    Because an adapter is just a tree of tensors, K adapters stack into one tree with a leading K
    dimension, and `torch.func.vmap` runs (and trains) all K in one call. Here K = 4 LoRA adapters on one
    tiny Llama each learn a different "skill": continuing arithmetic sequences with step 1, 2, 3 or 4.
    Then a single batch routes each example to the adapter of its own skill (PEFT's `adapter_names=`).
    """),
    QUIET,
    code("""
    import matplotlib.pyplot as plt
    import torch

    import funcpeft
    from funcpeft import testing

    warnings.filterwarnings("ignore", message="There is a performance drop")  # sdpa has no CPU batching rule
    torch.manual_seed(0)
    model = testing.tiny_llama()
    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    fn, base, _ = pm
    K, V = 4, testing.VOCAB
    g = torch.Generator().manual_seed(0)

    def sequences(step, n, length=12):
        \"\"\"n sequences (n, length): a random start, then +step each token (mod V).\"\"\"
        start = torch.randint(0, V, (n, 1), generator=g)
        return (start + step * torch.arange(length)) % V

    def loss_fn(adapter, ids):
        return fn(base, adapter, input_ids=ids, labels=ids).loss
    """),
    md("""
    ## 1. Train an ensemble in one vmapped step
    `stack_adapters` turns K trees into one tree with leaves `(K, ...)`. `vmap(value_and_grad(loss_fn))`
    maps over the adapters **and** over each adapter's own batch (`(K, 16, 12)`: skill k gets step k + 1).
    funcpeft's AdamW is elementwise, so one optimiser state on the stacked tree is K independent optimisers.
    """),
    code("""
    members = [pm.init_adapter(generator=torch.Generator().manual_seed(k)) for k in range(K)]
    stacked = funcpeft.stack_adapters(members)
    print({name: tuple(t.shape) for name, t in stacked["model.layers.0.self_attn.q_proj"].items()})

    train_step = torch.func.vmap(funcpeft.value_and_grad(loss_fn))
    opt = funcpeft.optim.adamw(1e-2, weight_decay=0.0)
    state = opt.init(stacked)
    history = []
    for _ in range(60):
        batch = torch.stack([sequences(k + 1, 16) for k in range(K)])  # (K, 16, 12)
        losses, grads = train_step(stacked, batch)
        updates, state = opt.update(grads, state, stacked)
        stacked = funcpeft.optim.apply_updates(stacked, updates)
        history.append(losses.detach())
    history = torch.stack(history)  # (steps, K)
    print("first losses", history[0].numpy().round(3), "last losses", history[-1].numpy().round(3))
    """),
    md("""
    ## 2. Each adapter learned its own skill
    Loss of every adapter on every skill's test sequences: the diagonal (own skill) is clearly lowest.
    `vmap` over the stacked tree gives exactly what a Python loop over the members gives.
    """),
    code("""
    test = torch.stack([sequences(k + 1, 8) for k in range(K)])  # (K skills, 8, 12)
    with torch.no_grad():
        cross = torch.stack([torch.func.vmap(loss_fn, in_dims=(0, None))(stacked, test[j]) for j in range(K)], 1)
        for k, member in enumerate(funcpeft.unstack_adapters(stacked)):  # vmap == loop
            torch.testing.assert_close(cross[k, 0], loss_fn(member, test[0]), atol=1e-5, rtol=1e-5)
    assert (cross.diagonal() < cross.min(1).values + 1e-6).all() and (cross.diagonal() + 0.3 < cross.mean(1)).all()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in range(K):
        ax1.plot(history[:, k], label=f"adapter {k} (step {k + 1})")
    ax1.set(xlabel="training step", ylabel="loss", title="4 adapters trained in one vmapped step")
    ax1.legend()
    im = ax2.imshow(cross, cmap="viridis")
    ax2.set_xticks(range(K), [f"step {k + 1}" for k in range(K)])
    ax2.set_yticks(range(K), [f"adapter {k}" for k in range(K)])
    ax2.set(xlabel="test sequences", title="loss of each adapter on each skill")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    plt.show()
    """),
    md("""
    ## 3. Per-example adapters in one batch
    `funcpeft.per_example(stacked, index)` makes example i use adapter `index[i]` (`-1`: no adapter). It works
    on padded batches with an `attention_mask` (vmap over the model does not): each adapted layer gathers
    every example's A and B and applies them batched, with no Python loop over adapters.
    """),
    code("""
    ids = torch.cat([sequences(k + 1, 2) for k in range(K)])  # 8 examples, 2 per skill
    skill = torch.arange(K).repeat_interleave(2)  # the adapter each example should use
    mask = torch.ones_like(ids)
    mask[1::2, 9:] = 0  # every other example is padded (3 tokens shorter)
    index = torch.where(torch.arange(len(ids)) == 7, -1, skill)  # the last example: base model, no adapter

    with torch.no_grad():
        routed = fn(base, funcpeft.per_example(stacked, index), input_ids=ids, attention_mask=mask).logits
        for k, member in enumerate(funcpeft.unstack_adapters(stacked)):
            alone = fn(base, member, input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(routed[index == k], alone[index == k], atol=1e-5, rtol=1e-5)
        assert torch.equal(routed[7], fn(base, None, input_ids=ids, attention_mask=mask).logits[7])
    print("routed batch == each adapter on its own examples; index -1 == the base model")
    """),
    md("""
    ## 4. PEFT's `adapter_names=`: registered adapters by name
    `mixed_batch` is the same routing by registered adapter name, with `"__base__"` for none.
    """),
    code("""
    first, second = funcpeft.unstack_adapters(stacked)[:2]
    pm.add_adapter("step2", pm.peft_config["default"])
    names = ["default", "step2", "__base__", "step2"]
    with torch.no_grad():
        mixed = fn(base, funcpeft.mixed_batch({"default": first, "step2": second}, names), input_ids=ids[:4]).logits
        torch.testing.assert_close(mixed[1], fn(base, second, input_ids=ids[:4]).logits[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[0], fn(base, first, input_ids=ids[:4]).logits[0], atol=1e-5, rtol=1e-5)
    print(mixed.shape)
    """),
]

PROPERTY_TESTING = [
    md("""
    # Testing your own code with funcpeft's hypothesis strategies

    `funcpeft.strategies` draws what model code built on funcpeft must cope with: tiny transformers models,
    LoRA configs that are valid *for a given model* (targets as suffixes, names, regexes, `"all-linear"`,
    layer selections, exclusions, rank patterns, biases, `modules_to_save`), random adapter trees (so that
    `lora_B != 0`) and padded inputs. `funcpeft.testing` has the assertions: `assert_adapter_is_noop`,
    `assert_only_adapter_gets_grads`, `assert_matches_peft`, `assert_trees_close`.

    In a test file you would write `@given(...)` on a `test_*` function and let pytest run it; here we call
    the decorated functions directly.
    """),
    QUIET,
    code("""
    import torch
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    import funcpeft
    from funcpeft import strategies as fst
    from funcpeft import testing

    warnings.filterwarnings("ignore", category=UserWarning)  # e.g. fan_in_fan_out forced for GPT-2's Conv1D
    # few examples, reproducible; no "explain" phase (it re-runs many variants of a failure: slow here)
    few = settings(max_examples=10, deadline=None, derandomize=True, database=None, phases=[Phase.generate, Phase.shrink])
    """),
    md("""
    ## 1. A property of your code
    Say your code turns a classifier's logits into probabilities. Whatever the model, config, adapter
    values and padding, they must sum to one:
    """),
    code("""
    def predict_proba(fn, base, adapter, **inputs):
        return fn(base, adapter, **inputs).logits.softmax(-1)

    @few
    @given(st.data())
    def test_probabilities_sum_to_one(data):
        model = data.draw(fst.tiny_models(["bert_seq_cls"]))
        fn, base, fresh = funcpeft.get_peft_model(model, data.draw(fst.lora_configs(model)))
        adapter = data.draw(fst.adapter_trees(fresh))
        p = predict_proba(fn, base, adapter, **data.draw(fst.model_inputs(model)))
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]))

    test_probabilities_sum_to_one()
    print("passed")
    """),
    md("""
    ## 2. Laws that hold for every model and config
    A fresh adapter (`init_lora_weights=True` or `"gaussian"`) is a no-op; only the adapter receives
    gradients; and funcpeft agrees with PEFT itself (`assert_matches_peft` runs both on the same values).
    """),
    code("""
    @few
    @given(fst.models_and_configs(init_lora_weights=[True, "gaussian"]), st.data())
    def test_laws(model_and_kwargs, data):
        model, kwargs = model_and_kwargs
        fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs))
        inputs = data.draw(fst.model_inputs(model, min_len=2))
        testing.assert_adapter_is_noop(fn, base, fresh, model, **inputs)
        adapter = data.draw(fst.adapter_trees(fresh))
        testing.assert_only_adapter_gets_grads(lambda a, b: fn(b, a, **inputs).logits.square().mean(), adapter, base)
        testing.assert_matches_peft(model, kwargs, adapter, **inputs)

    test_laws()
    print("passed")
    """),
    md("""
    ## 3. Hypothesis finds the bug
    Here is a hand-written merge (fold the adapter into the weights for serving) with a classic bug: it
    forgets the LoRA scaling `lora_alpha / r`. The property "merged weights give the adapter's outputs"
    fails, and hypothesis reports a small failing config (one where `lora_alpha != r`):
    """),
    code("""
    def my_merge(base, adapter):
        merged = dict(base)
        for path, leaves in adapter.items():
            merged[f"{path}.weight"] = base[f"{path}.weight"] + leaves["lora_B"] @ leaves["lora_A"]  # BUG: no scaling
        return merged

    plain_lora = fst.models_and_configs(["llama"], task_types=[None], biases=["none"], allow_modules_to_save=False)

    def merge_property(merge):
        @few
        @given(plain_lora, st.data())
        def test_merge(model_and_kwargs, data):
            model, kwargs = model_and_kwargs
            pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs))
            adapter = data.draw(fst.adapter_trees(pm.adapter))
            inputs = data.draw(fst.model_inputs(model))
            with torch.no_grad():
                torch.testing.assert_close(pm.fn(merge(pm, pm.base, adapter), None, **inputs).logits,
                                           pm.fn(pm.base, adapter, **inputs).logits, atol=1e-4, rtol=1e-4)
        return test_merge

    try:
        merge_property(lambda pm, base, adapter: my_merge(base, adapter))()
        raise RuntimeError("the bug went unnoticed")
    except AssertionError as failure:
        print("hypothesis found the bug:", str(failure).splitlines()[0])
        notes = "\\n".join(getattr(failure, "__notes__", []))
        print(notes.split("Explanation:")[0])  # the (shrunk) failing example
    """),
    md("""
    `funcpeft.merge` (scaling, rank/alpha patterns, rsLoRA, GPT-2's transposed Conv1D, ...) passes the same
    property:
    """),
    code("""
    merge_property(funcpeft.merge)()
    print("funcpeft.merge: passed")
    """),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_ensembles.ipynb": ENSEMBLES,
    "03_property_testing.ipynb": PROPERTY_TESTING,
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in cells]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: regenerating gives identical files
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(NOTEBOOKS[name])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the .ipynb files are up to date")
    args = p.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path, text = HERE / name, render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {stale}; run: python notebooks/build_notebooks.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
