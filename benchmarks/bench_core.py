"""Core benchmark: funcpeft vs PEFT on a random Llama (issue 2, "Performance").

Shape: LlamaForCausalLM hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000; batch 4 x 128; LoRA
r=16 alpha=32 on all linear layers (28 modules), fp32, B non-zero, eval mode (no dropout). funcpeft and
PEFT run interleaved in one process; the table gives medians and funcpeft/PEFT ratios.

    python benchmarks/bench_core.py                 # full run (a few minutes on 2 cores)
    python benchmarks/bench_core.py --quick         # smoke run (seconds; numbers are rough)
    python benchmarks/bench_core.py --rounds 30 --threads 2

Peak memory is the peak of tensor bytes allocated during one call above what existed before it (CPU:
torch.profiler allocation events; CUDA: the caching allocator's stats), see `_common.peak_memory`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from collections.abc import Callable
from typing import Any

import optree
import torch
from _common import fmt_mb, fmt_ms, interleaved, machine_note, markdown_table, median, paired_ratio, peak_memory, spread
from torch import nn

import funcpeft
from funcpeft.grad import value_and_grad
from funcpeft.methods.base import METHODS
from funcpeft.testing import assert_trees_close, copy_into_peft, peft_grads, random_like

BATCH, SEQ, VOCAB, LAYERS, HEADS = 4, 128, 4000, 4, 8
RANK, ALPHA = 16, 32


# -- setup ---------------------------------------------------------------------------------------------------
def build_llama(hidden: int, intermediate: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        vocab_size=VOCAB, max_position_embeddings=2 * SEQ,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def funcpeft_config() -> funcpeft.LoraConfig:
    return funcpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)


def peft_config() -> Any:
    import peft

    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)


def merged_base(pm: funcpeft.FunctionalPeftModel, adapter: Any) -> tuple[dict[str, torch.Tensor], str]:
    """`base` with the adapter merged into its weights, and where that came from (funcpeft.merge or inline)."""
    try:
        from funcpeft.merge import merge
    except ImportError:
        pass
    else:
        with torch.no_grad():
            return dict(merge(pm, pm.base, adapter)), "funcpeft.merge.merge"
    out = dict(pm.base)
    with torch.no_grad():
        for path, entry in pm.plans[pm.adapter_name].items():
            spec = entry["spec"]
            if spec is not None:
                params = {k: adapter[path][k] for k in entry["params"]}
                out[f"{path}.weight"] = pm.base[f"{path}.weight"] + METHODS[spec.method].delta_weight(spec, params)
    return out, "inline W + s*B@A (funcpeft.merge not available)"


class Fixture:
    """One model, its funcpeft (fn, base, adapter) with a random non-zero adapter, and an equal PEFT model."""

    def __init__(self, hidden: int, intermediate: int):
        import peft

        self.model = build_llama(hidden, intermediate)
        self.pm = funcpeft.get_peft_model(self.model, funcpeft_config())
        self.fn, self.base, adapter = self.pm
        self.adapter = random_like(adapter, torch.Generator().manual_seed(1))
        plan = self.pm.plans[self.pm.adapter_name]
        n_modules = sum(e["spec"] is not None for e in plan.values())
        if n_modules != 28:
            raise RuntimeError(f"expected 28 LoRA modules on the benchmark Llama, got {n_modules}")
        self.peft = peft.get_peft_model(copy.deepcopy(self.model), peft_config()).eval()
        copy_into_peft(self.peft, self.adapter, plan)
        self.peft_params = [p for p in self.peft.parameters() if p.requires_grad]
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
        self.infer_kw = {"input_ids": ids}
        self.train_kw = {"input_ids": ids, "labels": ids}

    def check_equal(self) -> tuple[float, float]:
        """(max |logit diff|, max |grad diff|) funcpeft vs PEFT; raises if they disagree."""
        with torch.no_grad():
            diff = (self.fn(self.base, self.adapter, **self.infer_kw).logits - self.peft(**self.infer_kw).logits).abs().max()
        self.zero_grads()
        self.peft(**self.train_kw).loss.backward()
        _, grads = value_and_grad(self.loss)(self.adapter)
        want = peft_grads(self.peft, self.adapter, self.pm.plans[self.pm.adapter_name])
        assert_trees_close(grads, want, atol=1e-5)
        gdiff = max((a - b).abs().max().item() for a, b in zip(optree.tree_leaves(grads), optree.tree_leaves(want)))
        self.zero_grads()
        if diff > 1e-4:
            raise AssertionError(f"funcpeft and PEFT logits differ by {diff.item():.3g}")
        return diff.item(), gdiff

    def loss(self, adapter: Any) -> torch.Tensor:
        return self.fn(self.base, adapter, **self.train_kw).loss

    def zero_grads(self, *_: Any) -> None:
        for p in self.peft_params + optree.tree_leaves(self.adapter):
            p.grad = None


# -- measurements --------------------------------------------------------------------------------------------
def train_variants(fx: Fixture) -> dict[str, Callable[[], Any]]:
    vag = value_and_grad(fx.loss)
    func_grad = torch.func.grad(fx.loss)
    return {
        "PEFT .backward()": lambda: fx.peft(**fx.train_kw).loss.backward(),
        "funcpeft value_and_grad": lambda: vag(fx.adapter),
        "funcpeft torch.func.grad": lambda: func_grad(fx.adapter),
        "funcpeft .backward()": lambda: fx.loss(fx.adapter).backward(),
    }


def infer_variants(fx: Fixture, merged: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    def no_grad(f: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return f()

        return run

    kw = fx.infer_kw
    return {
        "PEFT": no_grad(lambda: fx.peft(**kw)),
        "funcpeft fn": no_grad(lambda: fx.fn(fx.base, fx.adapter, **kw)),
        "base model alone": no_grad(lambda: fx.model(**kw)),
        "funcpeft fn, merged weights": no_grad(lambda: fx.fn(merged, None, **kw)),
    }


def setup_times(small: nn.Module, big: nn.Module, rounds: int, warmup: int, clock: str) -> dict[str, list[float]]:
    """get_peft_model on a fresh copy of the model each round (the copy is not timed)."""
    import peft

    fresh: dict[str, nn.Module] = {}
    models = {"512": small, "1024": big}

    def prepare(name: str) -> None:
        fresh.clear()
        gc.collect()
        fresh["m"] = copy.deepcopy(models[name.rsplit(" ", 1)[1]])

    variants = {
        "funcpeft 512": lambda: funcpeft.get_peft_model(fresh["m"], funcpeft_config()),
        "PEFT 512": lambda: peft.get_peft_model(fresh["m"], peft_config()),
        "funcpeft 1024": lambda: funcpeft.get_peft_model(fresh["m"], funcpeft_config()),
        "PEFT 1024": lambda: peft.get_peft_model(fresh["m"], peft_config()),
    }
    return interleaved(variants, rounds, warmup, before=prepare, clock=clock)


# -- report --------------------------------------------------------------------------------------------------
def cell(xs: list[float]) -> str:
    return f"{fmt_ms(median(xs))} (±{spread(xs) * 50:.0f}%)"


def ratio_row(what: str, ours: list[float], ref: list[float], target: float | None, ref_name: str = "PEFT") -> list[str]:
    r = paired_ratio(ours, ref)
    verdict = "-" if target is None else ("met" if r <= target else "MISSED")
    return [what, cell(ours), f"{ref_name}: {cell(ref)}", f"{r:.3f}", "report" if target is None else f"<= {target:.2f}", verdict]


def mem_row(what: str, ours: int, ref: int, target: float | None, ref_name: str = "PEFT") -> list[str]:
    r = ours / ref
    verdict = "-" if target is None else ("met" if r <= target else "MISSED")
    return [what, fmt_mb(ours), f"{ref_name}: {fmt_mb(ref)}", f"{r:.3f}", "report" if target is None else f"<= {target:.2f}", verdict]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds per measurement (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="discarded rounds first (default 5)")
    ap.add_argument("--setup-rounds", type=int, default=10, help="rounds for get_peft_model setup timing (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu (default): process CPU time, robust to other processes on a shared machine; wall: elapsed")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warmup: a smoke run, numbers are rough")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.setup_rounds = 3, 1, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"# funcpeft core benchmark\n\nbefore: {machine_note()}")
    fx = Fixture(512, 1376)
    logit_diff, grad_diff = fx.check_equal()
    merged, merged_source = merged_base(fx.pm, fx.adapter)
    with torch.no_grad():
        merged_diff = (fx.fn(merged, None, **fx.infer_kw).logits - fx.peft(**fx.infer_kw).logits).abs().max().item()
    print(
        f"Llama hidden 512, intermediate 1376, {LAYERS} layers, {HEADS} heads, vocab {VOCAB}, "
        f"attn={fx.model.config._attn_implementation}; batch {BATCH}x{SEQ}; LoRA r={RANK} alpha={ALPHA} on 28 modules, "
        f"fp32, eval mode.\nfuncpeft vs PEFT: max |logit diff| {logit_diff:.2g}, max |grad diff| {grad_diff:.2g}; "
        f"merged weights ({merged_source}) vs PEFT: max |logit diff| {merged_diff:.2g}.\n"
        f"{args.clock} clock; rounds {args.rounds} (+{args.warmup} warmup), setup rounds {args.setup_rounds}; cells are "
        "median (± half IQR); ratio is the median of per-round ratios (each pair ran back to back).\n",
        flush=True,
    )

    train = interleaved(train_variants(fx), args.rounds, args.warmup, before=fx.zero_grads, clock=args.clock)
    infer = interleaved(infer_variants(fx, merged), args.rounds, args.warmup, clock=args.clock)
    big = build_llama(1024, 2752)
    setup = setup_times(fx.model, big, args.setup_rounds, min(args.warmup, 2), args.clock)

    rows = []
    peft_train = train["PEFT .backward()"]
    for name in ("funcpeft value_and_grad", "funcpeft torch.func.grad", "funcpeft .backward()"):
        target = 1.00 if name == "funcpeft value_and_grad" else None
        rows.append(ratio_row(f"train step: {name.removeprefix('funcpeft ')}", train[name], peft_train, target))
    if not args.no_memory:
        mem = {}
        for name, f in train_variants(fx).items():
            fx.zero_grads()
            f()  # warm
            fx.zero_grads()
            mem[name] = peak_memory(f)
        fx.zero_grads()
        for name in ("funcpeft value_and_grad", "funcpeft torch.func.grad", "funcpeft .backward()"):
            target = 1.00 if name == "funcpeft value_and_grad" else None
            rows.append(mem_row(f"train peak memory: {name.removeprefix('funcpeft ')}", mem[name], mem["PEFT .backward()"], target))
    rows.append(ratio_row("inference: fn", infer["funcpeft fn"], infer["PEFT"], 1.00))
    rows.append(ratio_row("inference: base model alone (reference)", infer["base model alone"], infer["PEFT"], None))
    rows.append(ratio_row("inference: fn over merged weights", infer["funcpeft fn, merged weights"], infer["base model alone"], 1.02, "base model"))
    if not args.no_memory:
        imem = {name: peak_memory(f) for name, f in infer_variants(fx, merged).items()}
        rows.append(mem_row("inference peak memory: fn", imem["funcpeft fn"], imem["PEFT"], 1.00))
        rows.append(mem_row("inference peak memory: fn over merged weights", imem["funcpeft fn, merged weights"], imem["base model alone"], None, "base model"))
    rows.append(ratio_row("get_peft_model setup, hidden 512", setup["funcpeft 512"], setup["PEFT 512"], 1.00))
    rows.append(ratio_row("get_peft_model setup, hidden 1024 (4x weights)", setup["funcpeft 1024"], setup["PEFT 1024"], 1.00))
    rows.append(ratio_row("setup scaling, funcpeft: 1024 vs 512", setup["funcpeft 1024"], setup["funcpeft 512"], None, "512"))
    rows.append(ratio_row("setup scaling, PEFT: 1024 vs 512", setup["PEFT 1024"], setup["PEFT 512"], None, "512"))

    print(markdown_table(["measurement", "funcpeft", "reference", "ratio", "target", ""], rows))
    small_n = sum(p.numel() for p in fx.model.parameters())
    big_n = sum(p.numel() for p in big.parameters())
    print(
        f"\nweights: hidden 512 {small_n / 1e6:.1f}M, hidden 1024 {big_n / 1e6:.1f}M parameters "
        f"({big_n / small_n:.1f}x; transformer blocks 4x), 28 LoRA modules each.\nafter: {machine_note()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
