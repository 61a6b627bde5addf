"""Every method: funcpeft vs PEFT training step time and peak memory on the core benchmark's Llama.

Shape: bench_core's LlamaForCausalLM (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000), batch 4 x 128,
fp32, eval mode (no dropout), each method's config below (the same kwargs build `peft.<Config>` and
`funcpeft.<Config>`). Both libraries hold the same non-trivial adapter: PEFT's trainable parameters are perturbed,
saved with PEFT's `save_pretrained` and loaded into funcpeft with `from_pretrained` (no name mapping). The step is
loss + adapter gradients (`loss.backward()` for PEFT, `funcpeft.value_and_grad` for funcpeft); before timing, the
losses and the gradients (by checkpoint key) are checked equal. Rounds are interleaved (PEFT, funcpeft, PEFT A/A),
CPU clock, 1 torch thread; a ratio is the median of per-round ratios; PEFT A/A is the noise floor. Peak memory is
torch.profiler's allocation peak of one warmed step (deterministic).

    python benchmarks/bench_methods.py                      # every method funcpeft implements
    python benchmarks/bench_methods.py --methods lora oft   # some
    python benchmarks/bench_methods.py --quick              # smoke run (2 rounds)
    python benchmarks/bench_methods.py --device cuda --dtype bf16 --clock wall   # on a GPU (CUDA peak memory)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from typing import Any

import torch
from _common import fmt_mb, fmt_ms, machine_note, markdown_table, median, peak_memory, timing_args, versus_peft
from bench_core import BATCH, SEQ, VOCAB, build_llama

import funcpeft

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# method -> (config class, kwargs valid for PEFT and funcpeft on the benchmark Llama)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR)),
    "dora": ("LoraConfig", dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR, use_dora=True)),
    "ia3": ("IA3Config", dict(target_modules=ALL_LINEAR, feedforward_modules=["down_proj"])),
    "loha": ("LoHaConfig", dict(r=16, alpha=32, target_modules=ALL_LINEAR)),
    "lokr": ("LoKrConfig", dict(r=16, alpha=32, target_modules=ALL_LINEAR)),
    "vera": ("VeraConfig", dict(r=256, target_modules=ALL_LINEAR)),
    "oft": ("OFTConfig", dict(oft_block_size=32, target_modules=ATTENTION)),
    "boft": ("BOFTConfig", dict(boft_block_size=32, target_modules=ATTENTION)),
    "hra": ("HRAConfig", dict(r=8, target_modules=ALL_LINEAR)),
    "miss": ("MissConfig", dict(r=64, target_modules=ATTENTION)),
    "fourierft": ("FourierFTConfig", dict(n_frequency=1000, target_modules=ATTENTION)),
    "vblora": ("VBLoRAConfig", dict(r=4, num_vectors=64, vector_length=32, target_modules=ALL_LINEAR)),
    "randlora": ("RandLoraConfig", dict(r=32, target_modules=ALL_LINEAR)),
    "shira": ("ShiraConfig", dict(r=16, target_modules=ALL_LINEAR)),
    "c3a": ("C3AConfig", dict(block_size=64, target_modules=ATTENTION)),
    "ln_tuning": ("LNTuningConfig", dict(target_modules=["input_layernorm", "post_attention_layernorm"])),
    "trainable_tokens": ("TrainableTokensConfig", dict(target_modules=["embed_tokens"], token_indices=list(range(64)))),
    "adalora": ("AdaLoraConfig", dict(init_r=16, target_r=8, total_step=100, target_modules=ALL_LINEAR)),
    "hira": ("HiraConfig", dict(r=16, target_modules=ALL_LINEAR)),
    "gralora": ("GraloraConfig", dict(r=16, target_modules=ALL_LINEAR)),
    "tinylora": ("TinyLoraConfig", dict(r=2, u=64, target_modules=ALL_LINEAR)),
    "waveft": ("WaveFTConfig", dict(n_frequency=1000, target_modules=ATTENTION)),
    "delora": ("DeloraConfig", dict(r=16, target_modules=ALL_LINEAR)),
    "poly": (
        "PolyConfig",
        dict(task_type="CAUSAL_LM", r=8, n_tasks=4, n_skills=4, n_splits=4, target_modules=ALL_LINEAR),
    ),
    "psoft": ("PsoftConfig", dict(r=32, target_modules=ALL_LINEAR)),
    "osf": ("OSFConfig", dict(target_modules=ATTENTION)),
    "deft": ("DeftConfig", dict(r=16, target_modules=ALL_LINEAR)),
    "adamss": ("AdamssConfig", dict(r=32, num_subspaces=4, subspace_rank=2, target_modules=ATTENTION)),
    "pvera": ("PveraConfig", dict(r=256, target_modules=ALL_LINEAR)),
    "unilora": ("UniLoraConfig", dict(r=16, theta_d_length=4096, target_modules=ALL_LINEAR)),
    "glora": ("GloraConfig", dict(r=8, target_modules=ATTENTION)),
    "road": ("RoadConfig", dict(group_size=32, target_modules=ALL_LINEAR)),
    "beft": ("BeftConfig", dict(target_modules=ALL_LINEAR)),
    "supertuning": ("SupertuningConfig", dict(sparsity=0.99, target_modules=ALL_LINEAR)),
    "peanut": ("PeanutConfig", dict(r=16, target_modules=ATTENTION)),
    "lily": ("LilyConfig", dict(r=16, target_modules=ALL_LINEAR)),
    "frod": ("FrodConfig", dict(target_modules=ATTENTION)),
    "shadow": ("ShadowConfig", dict(task_type="CAUSAL_LM")),  # every decoder block; the mirrored shadow backbone
    # X-LoRA: 3 LoRA experts (r=16, attention; saved by PEFT with perturbed values), its default classifier
    "xlora": ("XLoraConfig", dict(task_type="CAUSAL_LM", hidden_size=512)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
XLORA_EXPERTS = 3
# model inputs a method needs besides input_ids / labels
EXTRA_INPUTS: dict[str, dict[str, Any]] = {"poly": {"task_ids": torch.arange(BATCH) % 4}}


def _quiet(fn: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


class Fixture:
    """One method on copies of the benchmark Llama: PEFT with perturbed adapter values, funcpeft loaded from its files."""

    def __init__(self, method: str, tmp: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        import peft

        cls, kwargs = METHODS[method]
        model = build_llama(512, 1376).to(device=device, dtype=dtype)
        torch.manual_seed(0)
        self.peft = _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), getattr(peft, cls)(**kwargs))).eval()
        self.peft_params = [p for p in self.peft.parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-trivial values near the init (multiplicative methods stay near identity)
            for p in self.peft_params:
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p))
        _quiet(lambda: self.peft.save_pretrained(tmp))
        self.pm = _quiet(lambda: funcpeft.from_pretrained(model, tmp, is_trainable=True))
        self.fn, self.base, self.adapter = self.pm
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2)).to(device)
        extra = {k: v.to(device) for k, v in EXTRA_INPUTS.get(method, {}).items()}
        self.kw = {"input_ids": ids, "labels": ids, **extra}
        self.step = funcpeft.value_and_grad(lambda a: self.fn(self.base, a, **self.kw).loss)

    def peft_step(self) -> torch.Tensor:
        loss = self.peft(**self.kw).loss
        loss.backward()
        return loss.detach()

    def zero_grads(self, *_: Any) -> None:
        for p in self.peft_params:
            p.grad = None

    def check_equal(self) -> tuple[float, float]:
        """(|loss diff|, max |grad diff|) against PEFT, gradients compared by checkpoint key."""
        from peft.utils import get_peft_model_state_dict

        self.zero_grads()
        want = self.peft_step()
        with torch.no_grad():  # PEFT's gradients keyed like its checkpoint: swap each grad into its parameter
            saved = [(p, p.data) for p in self.peft_params]
            for p in self.peft_params:
                p.data = p.grad if p.grad is not None else torch.zeros_like(p)
            want_grads = {k: v.clone() for k, v in get_peft_model_state_dict(self.peft).items()}
            for p, data in saved:
                p.data = data
        self.zero_grads()
        loss, grads = self.step(self.adapter)
        got = funcpeft.io.checkpoint_state(grads, self.pm.peft_config["default"], self.pm.model, base_params=self.base)
        diffs = [(got[k].float() - want_grads[k].float()).abs().max().item() for k in want_grads if k in got]
        missing = sorted(set(want_grads) - set(got))
        if missing:
            raise AssertionError(f"gradients missing in funcpeft: {missing[:3]}")
        return abs(loss.item() - want.item()), max(diffs, default=0.0)


class XLoraFixture(Fixture):
    """X-LoRA: LoRA experts saved by PEFT (perturbed values), both libraries built on them, funcpeft's classifier
    set to PEFT's; the step trains the classifier (the experts are frozen, PEFT's default)."""

    def __init__(self, method: str, tmp: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        import os

        import peft

        cls, kwargs = METHODS[method]
        model = build_llama(512, 1376).to(device=device, dtype=dtype)
        model.config.use_cache = False  # X-LoRA's requirement
        g = torch.Generator().manual_seed(1)
        adapters = {}
        for i in range(XLORA_EXPERTS):
            torch.manual_seed(i)
            lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION)
            expert = _quiet(lambda lora=lora: peft.get_peft_model(copy.deepcopy(model), lora))
            with torch.no_grad():
                for p in expert.parameters():
                    if p.requires_grad:
                        p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p))
            adapters[str(i)] = os.path.join(tmp, f"expert{i}")
            _quiet(lambda expert=expert, i=i: expert.save_pretrained(adapters[str(i)]))
        config = {**kwargs, "adapters": adapters}
        torch.manual_seed(0)
        self.peft = _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), getattr(peft, cls)(**config))).eval()
        self.peft_params = [p for p in self.peft.parameters() if p.requires_grad]
        self.pm = _quiet(lambda: funcpeft.get_peft_model(model, getattr(funcpeft, cls)(**config)))
        self.fn, self.base, self.adapter = self.pm
        named = dict(self.peft.named_parameters())
        prefix = "base_model.internal_xlora_classifier."
        self.keys = {}
        for path, leaves in self.adapter["classifier"].items():
            for leaf in leaves:
                self.keys[(path, leaf)] = named[f"{prefix}{path}.{leaf}"]
                leaves[leaf] = self.keys[(path, leaf)].detach().clone().requires_grad_()
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2)).to(device)
        self.kw = {"input_ids": ids, "labels": ids}
        self.step = funcpeft.value_and_grad(lambda a: self.fn(self.base, a, **self.kw).loss)

    def check_equal(self) -> tuple[float, float]:
        """(|loss diff|, max |grad diff|) against PEFT, the classifier's gradients by parameter."""
        self.zero_grads()
        want = self.peft_step()
        loss, grads = self.step(self.adapter)
        diffs = [
            (grads["classifier"][path][leaf] - p.grad).abs().max().item()
            for (path, leaf), p in self.keys.items()
            if p.grad is not None
        ]
        if len(diffs) != len(self.keys):
            raise AssertionError("PEFT's classifier got no gradient")
        self.zero_grads()
        return abs(loss.item() - want.item()), max(diffs, default=0.0)


FIXTURES: dict[str, type[Fixture]] = {"xlora": XLoraFixture}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; use --clock wall on an accelerator")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's dtype (default fp32)")
    finish = timing_args(ap, rounds=8, warmup=2)
    args = finish(ap.parse_args(argv))
    dtype = DTYPES[args.dtype]
    print(f"# funcpeft per-method benchmark\n\nbefore: {machine_note()}\n")
    print(
        f"Llama h512/i1376/4 layers, batch {BATCH}x{SEQ}, {args.dtype} on {args.device}, {args.clock} clock, {args.rounds} rounds "
        f"(+{args.warmup} warmup), 1 thread. Ratio = funcpeft / PEFT (median of per-round ratios).\n",
        flush=True,
    )
    rows = []
    for method in args.methods:
        cls, _ = METHODS[method]
        if not hasattr(funcpeft, cls):
            rows.append([method, "-", "-", "-", "-", "-", "-", "not implemented in funcpeft"])
            continue
        with tempfile.TemporaryDirectory() as tmp:
            fx = FIXTURES.get(method, Fixture)(method, tmp, args.device, dtype)
            loss_diff, grad_diff = fx.check_equal()
            times, ratio, noise = versus_peft(
                fx.peft_step, lambda fx=fx: fx.step(fx.adapter), args, before=fx.zero_grads
            )
            fx.zero_grads()
            peak_peft = peak_memory(fx.peft_step, args.device)
            fx.zero_grads()
            peak_ours = peak_memory(lambda fx=fx: fx.step(fx.adapter), args.device)
            fx.zero_grads()
        rows.append(
            [
                method,
                fmt_ms(median(times["funcpeft"])),
                fmt_ms(median(times["PEFT"])),
                f"{ratio:.3f} (noise {noise:.3f})",
                fmt_mb(peak_ours),
                fmt_mb(peak_peft),
                f"{peak_ours / peak_peft:.3f}",
                f"loss diff {loss_diff:.1e}, grad diff {grad_diff:.1e}",
            ]
        )
        print(f"{method}: time ratio {ratio:.3f}, memory ratio {peak_ours / peak_peft:.3f}", flush=True)
    print()
    print(
        markdown_table(
            [
                "method",
                "funcpeft step",
                "PEFT step",
                "time ratio",
                "funcpeft peak",
                "PEFT peak",
                "memory ratio",
                "equal?",
            ],
            rows,
        )
    )
    print(f"\nafter: {machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
