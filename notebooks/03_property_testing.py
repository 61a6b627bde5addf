# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Testing your own code with funcpeft's hypothesis strategies
#
# `funcpeft.strategies` draws the inputs that model code built on funcpeft must cope with:
#
# - tiny transformers models;
# - LoRA configs that are valid *for a given model*: targets as suffixes, names, regexes or `"all-linear"`,
#   layer selections, exclusions, rank patterns, biases, `modules_to_save`;
# - random adapter trees, so that `lora_B != 0`;
# - padded inputs.
#
# `funcpeft.testing` has the assertions: `assert_adapter_is_noop`, `assert_only_adapter_gets_grads`,
# `assert_matches_peft` and `assert_trees_close`.
#
# In a test file you would put `@given(...)` on a `test_*` function and let pytest run it. Here we call the
# decorated functions directly.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets: harmless
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from transformers' internals

# %%
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import funcpeft
from funcpeft import strategies as fst
from funcpeft import testing

warnings.filterwarnings("ignore", category=UserWarning)  # e.g. fan_in_fan_out forced for GPT-2's Conv1D
# Few examples, reproducible. No "explain" phase: it re-runs many variants of a failure, which is slow here.
few = settings(max_examples=10, deadline=None, derandomize=True, database=None, phases=[Phase.generate, Phase.shrink])

# %% [markdown]
# ## 1. A property of your code
#
# Say your code turns a classifier's logits into probabilities. Whatever the model, the config, the adapter's
# values and the padding, the probabilities must sum to one:


# %%
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

# %% [markdown]
# ## 2. Laws that hold for every model and config
#
# - A fresh adapter (`init_lora_weights=True` or `"gaussian"`) is a no-op.
# - Only the adapter receives gradients.
# - funcpeft agrees with PEFT itself: `assert_matches_peft` runs both on the same adapter values.


# %%
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

# %% [markdown]
# ## 3. Hypothesis finds the bug
#
# Here is a hand-written merge, which folds the adapter into the weights for serving. It has a classic bug: it
# forgets the LoRA scaling `lora_alpha / r`. The property "the merged weights give the adapter's outputs"
# fails, and hypothesis reports a small failing config, one where `lora_alpha != r`:


# %%
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
            torch.testing.assert_close(
                pm.fn(merge(pm, pm.base, adapter), None, **inputs).logits,
                pm.fn(pm.base, adapter, **inputs).logits,
                atol=1e-4,
                rtol=1e-4,
            )

    return test_merge


try:
    merge_property(lambda pm, base, adapter: my_merge(base, adapter))()
    raise RuntimeError("the bug went unnoticed")
except AssertionError as failure:
    print("hypothesis found the bug:", str(failure).splitlines()[0])
    notes = "\n".join(getattr(failure, "__notes__", []))
    print(notes.split("Explanation:")[0])  # the (shrunk) failing example

# %% [markdown]
# `funcpeft.merge` handles the scaling, rank and alpha patterns, rsLoRA and GPT-2's transposed Conv1D, among
# others. It passes the same property:

# %%
merge_property(funcpeft.merge)()
print("funcpeft.merge: passed")
