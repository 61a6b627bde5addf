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
# # Many adapters at once: ensembles with `vmap`, and per-example adapters
#
# An adapter is a tree of tensors, so K adapters stack into one tree with a leading dimension of size K, and
# `torch.func.vmap` runs (and trains) all K in one call.
#
# Here K = 4 LoRA adapters on one tiny Llama each learn a different "skill": continuing arithmetic sequences
# with step 1, 2, 3 or 4. Then a single batch sends each example to the adapter of its own skill, as PEFT's
# `adapter_names=` does.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets: harmless
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from transformers' internals

# %%
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
    """n sequences (n, length): a random start, then +step each token (mod V)."""
    start = torch.randint(0, V, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % V


def loss_fn(adapter, ids):
    return fn(base, adapter, input_ids=ids, labels=ids).loss


# %% [markdown]
# ## 1. Train an ensemble in one vmapped step
#
# - `stack_adapters` turns K trees into one tree whose leaves have shape `(K, ...)`.
# - `vmap(value_and_grad(loss_fn))` maps over the adapters **and** over each adapter's own batch: the batch
#   has shape `(K, 16, 12)`, and adapter k gets sequences with step k + 1.
# - funcpeft's AdamW is elementwise, so one optimiser state on the stacked tree is K independent optimisers.

# %%
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

# %% [markdown]
# ## 2. Each adapter learned its own skill
#
# Below is the loss of every adapter on every skill's test sequences. Each adapter's loss is lowest on its own
# skill (the diagonal). `vmap` over the stacked tree gives the same numbers as a Python loop over the members.

# %%
test = torch.stack([sequences(k + 1, 8) for k in range(K)])  # (K skills, 8, 12)
with torch.no_grad():
    cross = torch.stack([torch.func.vmap(loss_fn, in_dims=(0, None))(stacked, test[j]) for j in range(K)], 1)
    for k, member in enumerate(funcpeft.unstack_adapters(stacked)):  # vmap == loop
        torch.testing.assert_close(cross[k, 0], loss_fn(member, test[0]), atol=1e-5, rtol=1e-5)
assert (cross.diagonal() < cross.min(1).values + 1e-6).all() and (cross.diagonal() + 0.3 < cross.mean(1)).all()

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=72)  # a modest dpi keeps the notebook small
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

# %% [markdown]
# ## 3. Per-example adapters in one batch
#
# `funcpeft.per_example(stacked, index)` makes example i use adapter `index[i]`, or no adapter where
# `index[i] = -1`. It works on padded batches with an `attention_mask`, where vmap over the model does not:
# each adapted layer gathers every example's A and B and applies them as one batched product, with no Python
# loop over adapters.

# %%
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

# %% [markdown]
# ## 4. PEFT's `adapter_names=`: registered adapters by name
#
# `mixed_batch` does the same routing by registered adapter name; `"__base__"` means no adapter.

# %%
first, second = funcpeft.unstack_adapters(stacked)[:2]
pm.add_adapter("step2", pm.peft_config["default"])
names = ["default", "step2", "__base__", "step2"]
with torch.no_grad():
    mixed = fn(base, funcpeft.mixed_batch({"default": first, "step2": second}, names), input_ids=ids[:4]).logits
    torch.testing.assert_close(mixed[1], fn(base, second, input_ids=ids[:4]).logits[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], fn(base, first, input_ids=ids[:4]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], fn(base, None, input_ids=ids[:4]).logits[2], atol=1e-5, rtol=1e-5)
print(mixed.shape)
