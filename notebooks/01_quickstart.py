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
# # funcpeft quickstart
#
# funcpeft gives you HuggingFace PEFT's adapters as **pure functions**. `get_peft_model` returns
# `(fn, base, adapter)`:
#
# - `base`: the model's frozen weights;
# - `adapter`: a plain dict of trainable tensors;
# - `fn(base, adapter, **inputs)`: the model's forward pass with the adapter applied.
#
# The model itself is never modified.
#
# This notebook uses a tiny random Llama (`funcpeft.testing.tiny_llama`) so that it runs in seconds on a CPU.
# Any transformers model works the same way, for example one from `AutoModelForCausalLM.from_pretrained(...)`.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets: harmless
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from transformers' internals

# %%
import copy
import tempfile
from pathlib import Path

import torch

import funcpeft
from funcpeft import testing

torch.manual_seed(0)
model = testing.tiny_llama()  # LlamaForCausalLM: hidden size 64, 2 layers, vocabulary of 128 tokens
ids = torch.randint(1, testing.VOCAB, (2, 12))  # a batch of 2 sequences of 12 tokens

# %% [markdown]
# ## 1. `get_peft_model`: PEFT's arguments in, `(fn, base, adapter)` out
#
# The config classes are PEFT's (same fields, same defaults). The adapter is a nested dict
# `{module path: {"lora_A": (r, in), "lora_B": (out, r)}}`, so any pytree tool works on it.

# %%
config = funcpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")  # every linear layer but lm_head
pm = funcpeft.get_peft_model(model, config)
fn, base, adapter = pm
pm.print_trainable_parameters()  # the same line (and numbers) as PEFT's
for path, leaves in list(adapter.items())[:2]:
    print(path, {name: tuple(t.shape) for name, t in leaves.items()})

# %% [markdown]
# `fn` is pure: the same inputs give the same output, and nothing is mutated. A fresh LoRA adapter has
# `lora_B = 0`, so it starts as a no-op. The model still has its plain `nn.Linear` layers.

# %%
out = fn(base, adapter, input_ids=ids)
assert torch.equal(out.logits, model(input_ids=ids).logits)
assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
print(out.logits.shape)

# %% [markdown]
# ## 2. Gradients with respect to the adapter
#
# `funcpeft.value_and_grad` returns `(loss, grads)`, where `grads` has the shape of the adapter tree. At top
# level it calls `torch.autograd.grad`, so it uses the same memory as PEFT. `torch.func.grad` gives the same
# numbers.


# %%
def loss_fn(adapter, ids):
    return fn(base, adapter, input_ids=ids, labels=ids).loss


loss, grads = funcpeft.value_and_grad(loss_fn)(adapter, ids)
testing.assert_trees_close(grads, torch.func.grad(loss_fn)(adapter, ids))
print(f"loss {loss:.4f}, |grad lora_B| in layer 0: {grads['model.layers.0.self_attn.q_proj']['lora_B'].norm():.3e}")

# %% [markdown]
# ## 3. Train
#
# `funcpeft.optim` has pure optimisers (`init`, `update`, `apply_updates`): each step returns a new adapter
# tree. `torch.optim` works too, because the leaves are ordinary tensors. Here the adapter memorises the batch.

# %%
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

# %% [markdown]
# ## 4. Save and load, in PEFT's format
#
# `save_pretrained` writes `adapter_config.json` and `adapter_model.safetensors` exactly as PEFT does.
#
# - `funcpeft.load_adapter` reads them back as `(tree, config)`.
# - `funcpeft.from_pretrained` is PEFT's `PeftModel.from_pretrained`: it checks every tensor against the
#   model and returns `(fn, base, adapter)`.

# %%
workdir = Path(tempfile.mkdtemp())
pm.save_pretrained(workdir / "my-adapter", adapter)
print(sorted(p.name for p in (workdir / "my-adapter").iterdir()))

tree, saved_config = funcpeft.load_adapter(workdir / "my-adapter")
testing.assert_trees_close(tree, adapter, atol=0)
fn2, base2, adapter2 = funcpeft.from_pretrained(model, workdir / "my-adapter")
assert torch.equal(fn2(base2, adapter2, input_ids=ids).logits, fn(base, adapter, input_ids=ids).logits)
print(f"r={saved_config.r}, {len(saved_config.target_modules)} target modules")

# %% [markdown]
# ## 5. PEFT interop, both ways
#
# PEFT loads the files that funcpeft writes, and funcpeft loads the files that PEFT writes. Both give the
# same outputs.

# %%
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

# %% [markdown]
# ## 6. Merge for deployment
#
# `merge_and_unload` returns a **new** plain model whose weights are `W + scale * B @ A`. The original model
# stays as it was.

# %%
merged = funcpeft.merge_and_unload(pm, adapter)
with torch.no_grad():
    torch.testing.assert_close(merged(input_ids=ids).logits, fn(base, adapter, input_ids=ids).logits)
assert torch.equal(model(input_ids=ids).logits, out.logits)  # the original model is unchanged
print(type(merged).__name__)

# %% [markdown]
# ## Next
#
# - `02_ensembles.ipynb`: many adapters at once.
# - `03_property_testing.ipynb`: testing your own code with funcpeft's hypothesis strategies.
# - `docs/usage.md`: the PEFT -> funcpeft table and the limits.
