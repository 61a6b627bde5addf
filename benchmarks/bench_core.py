"""Core benchmark: funcpeft vs PEFT on a random Llama (issue 2, "Performance").

Shape: LlamaForCausalLM hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000; batch 4 x 128; LoRA
r=16 alpha=32 on all linear layers (28 modules), fp32, B non-zero, eval mode (no dropout). funcpeft and
PEFT run interleaved in one process; the table gives medians and funcpeft/PEFT ratios.

    python benchmarks/bench_core.py                 # full run (a few minutes on 2 cores)
    python benchmarks/bench_core.py --quick         # smoke run (seconds; numbers are rough)
    python benchmarks/bench_core.py --rounds 30 --threads 2

Timing (defaults chosen for a shared, noisy 2-core machine; see the flags): process CPU time (`--clock`),
1 torch thread, each variant run once untimed right before its timed call (`--no-warm-each`), glibc malloc
told not to trim (`--system-malloc`; see `_common.steady_malloc`). The ratio is the median of per-round
ratios with a bootstrap 95% CI, and PEFT is timed twice per round (A/A) to show the noise floor.
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
from _common import (
    fmt_mb,
    fmt_ms,
    interleaved,
    machine_note,
    markdown_table,
    median,
    minor_faults,
    paired_ratio,
    paired_ratio_ci,
    peak_memory,
    spread,
    steady_malloc,
)
from torch import nn

import funcpeft
from funcpeft.grad import value_and_grad
from funcpeft.testing import assert_trees_close, copy_into_peft, peft_grads, random_like

BATCH, SEQ, VOCAB, LAYERS, HEADS = 4, 128, 4000, 4, 8
RANK, ALPHA = 16, 32


# -- setup ---------------------------------------------------------------------------------------------------
def build_llama(hidden: int, intermediate: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=2 * SEQ,
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
    """`base` with the adapter merged into its weights, and where that came from."""
    with torch.no_grad():
        return dict(funcpeft.merge(pm, pm.base, adapter)), "funcpeft.merge"


class Fixture:
    """One model, its funcpeft (fn, base, adapter) with a random non-zero adapter, and an equal PEFT model."""

    def __init__(self, hidden: int, intermediate: int):
        import peft

        self.model = build_llama(hidden, intermediate)
        self.pm = funcpeft.get_peft_model(self.model, funcpeft_config())
        self.fn, self.base, adapter = self.pm
        self.adapter = random_like(adapter, torch.Generator().manual_seed(1))
        plan = self.pm.plans[self.pm.adapter_name]
        n_modules = sum(e.spec is not None for e in plan.values())
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
            diff = (
                (self.fn(self.base, self.adapter, **self.infer_kw).logits - self.peft(**self.infer_kw).logits)
                .abs()
                .max()
            )
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
AA = " (A/A)"  # the reference run a second time: its ratio to the first is the noise floor


def train_variants(fx: Fixture) -> dict[str, Callable[[], Any]]:
    vag = value_and_grad(fx.loss)
    func_grad = torch.func.grad(fx.loss)

    def peft_step() -> None:
        fx.peft(**fx.train_kw).loss.backward()

    return {
        "PEFT": peft_step,
        "value_and_grad": lambda: vag(fx.adapter),
        "torch.func.grad": lambda: func_grad(fx.adapter),
        ".backward()": lambda: fx.loss(fx.adapter).backward(),
        "PEFT" + AA: peft_step,
    }


def infer_variants(fx: Fixture, merged: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    def no_grad(f: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return f()

        return run

    kw = fx.infer_kw
    peft_call = no_grad(lambda: fx.peft(**kw))
    return {
        "PEFT": peft_call,
        "fn": no_grad(lambda: fx.fn(fx.base, fx.adapter, **kw)),
        "base model": no_grad(lambda: fx.model(**kw)),
        "fn, merged": no_grad(lambda: fx.fn(merged, None, **kw)),
        "PEFT" + AA: peft_call,
    }


def faults_per_call(variants: dict[str, Callable[[], Any]], reset: Callable[..., Any], calls: int = 3) -> str:
    """'name: median minor page faults per call, ...' after one warm call each (an allocator diagnostic)."""
    out = []
    for name, f in variants.items():
        if name.endswith(AA):
            continue
        reset()
        f()
        counts = []
        for _ in range(calls):
            reset()
            counts.append(minor_faults(f))
        out.append(f"{name} {median(counts):.0f}")
    reset()
    return ", ".join(out)


def peak_memories(variants: dict[str, Callable[[], Any]], reset: Callable[..., Any]) -> dict[str, int]:
    out = {}
    for name, f in variants.items():
        reset()
        f()  # warm: lazily created state is not the step's memory
        reset()
        out[name] = peak_memory(f)
    reset()
    return out


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
class Table:
    """Rows of (measurement, funcpeft, reference, ratio, target, verdict)."""

    HEADERS = ("measurement", "funcpeft", "reference", "ratio [95% CI]", "target", "verdict")

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def add(
        self, what: str, ours: str, ref: str, r: float, target: float | None, ci: tuple[float, float] | None = None
    ) -> None:
        """verdict: met (ratio <= target), parity (the ratio's 95% CI reaches the target) or MISSED."""
        if target is None:
            verdict, goal = "-", "report"
        else:
            goal = f"<= {target:.2f}"
            verdict = "met" if r <= target else "parity (CI)" if ci is not None and ci[0] <= target else "MISSED"
        ratio = f"{r:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "")
        self.rows.append([what, ours, ref, ratio, goal, verdict])

    def time(self, what: str, ours: list[float], ref: list[float], target: float | None, ref_name: str) -> None:
        ci = paired_ratio_ci(ours, ref) if len(ours) >= 4 else None
        self.add(what, _cell(ours), f"{ref_name}: {_cell(ref)}", paired_ratio(ours, ref), target, ci)

    def memory(self, what: str, ours: int, ref: int, target: float | None, ref_name: str) -> None:
        self.add(what, fmt_mb(ours), f"{ref_name}: {fmt_mb(ref)}", ours / ref, target)

    def __str__(self) -> str:
        return markdown_table(self.HEADERS, self.rows)


def _cell(xs: list[float]) -> str:
    return fmt_ms(median(xs)) + (f" (±{spread(xs) * 50:.0f}%)" if len(xs) >= 4 else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds per measurement (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="discarded rounds first (default 5)")
    ap.add_argument("--setup-rounds", type=int, default=10, help="rounds for get_peft_model setup timing (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu (default): process CPU time, robust to other processes on a shared machine; wall: elapsed",
    )
    ap.add_argument(
        "--no-warm-each",
        action="store_true",
        help="do not run each variant once untimed before its timed call (halves the time; cache-order bias)",
    )
    ap.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default trim/mmap thresholds (page faults then add noise; see _common.steady_malloc)",
    )
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warmup: a smoke run, numbers are rough")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.setup_rounds = 3, 1, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steady = False if args.system_malloc else steady_malloc()
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
        f"{args.clock} clock; rounds {args.rounds} (+{args.warmup} warmup), setup rounds {args.setup_rounds}, "
        f"warm each: {not args.no_warm_each}; malloc: {'steady (no trim)' if steady else 'system default'}; cells are median (± half IQR); ratio is the median of per-round ratios "
        "(each pair ran in the same round), with a bootstrap 95% CI; PEFT (A/A) is PEFT timed twice per round: a noise "
        "check. verdict: met (ratio <= target), parity (CI reaches the target: equal within noise), MISSED.\n",
        flush=True,
    )
    timing = {"rounds": args.rounds, "warmup": args.warmup, "clock": args.clock, "warm_each": not args.no_warm_each}
    train = interleaved(train_variants(fx), before=fx.zero_grads, **timing)
    infer = interleaved(infer_variants(fx, merged), **timing)
    big = build_llama(1024, 2752)
    setup = setup_times(fx.model, big, args.setup_rounds, min(args.warmup, 2), args.clock)

    table = Table()
    table.time("train step: value_and_grad", train["value_and_grad"], train["PEFT"], 1.00, "PEFT")
    table.time("train step: torch.func.grad", train["torch.func.grad"], train["PEFT"], None, "PEFT")
    table.time("train step: .backward() on adapter leaves", train[".backward()"], train["PEFT"], None, "PEFT")
    table.time("train step: noise floor (PEFT A/A)", train["PEFT" + AA], train["PEFT"], None, "PEFT")
    if not args.no_memory:
        mem = peak_memories(train_variants(fx), fx.zero_grads)
        table.memory("train peak memory: value_and_grad", mem["value_and_grad"], mem["PEFT"], 1.00, "PEFT")
        table.memory("train peak memory: torch.func.grad", mem["torch.func.grad"], mem["PEFT"], None, "PEFT")
        table.memory("train peak memory: .backward()", mem[".backward()"], mem["PEFT"], None, "PEFT")
    table.time("inference: fn", infer["fn"], infer["PEFT"], 1.00, "PEFT")
    table.time("inference: base model alone (reference)", infer["base model"], infer["PEFT"], None, "PEFT")
    table.time("inference: fn over merged weights", infer["fn, merged"], infer["base model"], 1.02, "base model")
    table.time("inference: noise floor (PEFT A/A)", infer["PEFT" + AA], infer["PEFT"], None, "PEFT")
    if not args.no_memory:
        imem = peak_memories(infer_variants(fx, merged), lambda: None)
        table.memory("inference peak memory: fn", imem["fn"], imem["PEFT"], 1.00, "PEFT")
        table.memory(
            "inference peak memory: fn over merged weights", imem["fn, merged"], imem["base model"], None, "base model"
        )
    table.time("get_peft_model setup, hidden 512", setup["funcpeft 512"], setup["PEFT 512"], 1.00, "PEFT")
    table.time("get_peft_model setup, hidden 1024", setup["funcpeft 1024"], setup["PEFT 1024"], 1.00, "PEFT")
    table.time(
        "setup scaling, funcpeft: hidden 1024 vs 512", setup["funcpeft 1024"], setup["funcpeft 512"], None, "512"
    )
    table.time("setup scaling, PEFT: hidden 1024 vs 512", setup["PEFT 1024"], setup["PEFT 512"], None, "512")
    print(table)
    print(
        "\nminor page faults per call (median of 3): train: "
        + faults_per_call(train_variants(fx), fx.zero_grads)
        + "; inference: "
        + faults_per_call(infer_variants(fx, merged), lambda: None)
    )

    sizes = {h: (sum(p.numel() for p in m.parameters()), _adapter_numel(m)) for h, m in ((512, fx.model), (1024, big))}
    (w5, a5), (w10, a10) = sizes[512], sizes[1024]
    print(
        f"\nsetup scaling: hidden 1024 has {w10 / w5:.1f}x the weights ({w5 / 1e6:.1f}M -> {w10 / 1e6:.1f}M; blocks 4x) and "
        f"{a10 / a5:.1f}x the adapter ({a5 / 1e3:.0f}k -> {a10 / 1e3:.0f}k), same 28 LoRA modules.\n"
        f"peak memory: tensor bytes allocated during one call above what existed before it (torch.profiler "
        f"profile_memory allocation events; see benchmarks/_common.py).\nafter: {machine_note()}"
    )
    return 0


def _adapter_numel(model: nn.Module) -> int:
    pm = funcpeft.get_peft_model(model, funcpeft_config())
    return sum(t.numel() for t in optree.tree_leaves(pm.adapter))


if __name__ == "__main__":
    sys.exit(main())
