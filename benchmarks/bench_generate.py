"""Generation benchmark: funcpeft's generate (eager, and compiled with `funcpeft.Decoder`) vs PEFT's (issue 13).

Shape: LlamaForCausalLM hidden 256, intermediate 688, 4 layers, 4 heads, vocab 4000; batch 4, prompt 32
(rows 1-3 left-padded by 1-3 tokens), 64 new tokens, greedy (no EOS: every call makes 64 tokens); LoRA
r=16 alpha=32 on all linear layers, fp32, B non-zero. funcpeft and PEFT run interleaved in one process;
the table gives median time per generated token and funcpeft/PEFT ratios.

    python benchmarks/bench_generate.py              # full run (a few minutes on 2 cores, most of it compiling)
    python benchmarks/bench_generate.py --quick      # smoke run (numbers are rough)
    python benchmarks/bench_generate.py --backend aot_eager

Rows: one adapter (`pm.generate` vs `peft_model.generate`), the compiled Decoder (static cache, one-token
step compiled with `--backend`, inductor by default) vs PEFT's eager generate, and a mixed batch of 4
adapters (`funcpeft.mixed_batch` vs PEFT's `adapter_names=`), eager and compiled. Timing as in
bench_core.py: process CPU time, 1 torch thread, each variant run once untimed right before its timed
call, the ratio is the median of per-round ratios with a bootstrap 95% CI, and PEFT is timed twice per
round (A/A) to show the noise floor. First-compile times (the first call of each compiled Decoder,
prefill and generation included) are reported apart. Before timing, the tokens are checked: funcpeft eager
= PEFT, and compiled = eager (an inductor run may differ where two logits tie within rounding: reported).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _common import interleaved, machine_note, markdown_table, median, paired_ratio, paired_ratio_ci, spread
from torch import nn

import funcpeft
from funcpeft.testing import copy_into_peft, random_like

BATCH, PROMPT, NEW, VOCAB, LAYERS, HEADS = 4, 32, 64, 4000, 4, 4
HIDDEN, INTERMEDIATE, RANK, ALPHA, ADAPTERS = 256, 688, 16, 32, 4
AA = " (A/A)"


def build_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # every call generates NEW tokens
    model.generation_config.pad_token_id = 0
    return model


class Fixture:
    """The model, funcpeft's pm with ADAPTERS registered random adapters, PEFT's model holding the same values."""

    def __init__(self) -> None:
        import peft

        self.model = build_llama()
        names = [f"a{i}" for i in range(ADAPTERS)]
        cfg: dict[str, Any] = {"r": RANK, "lora_alpha": ALPHA, "target_modules": "all-linear", "lora_dropout": 0.0}
        self.pm = funcpeft.get_peft_model(self.model, funcpeft.LoraConfig(**cfg), adapter_name=names[0])
        self.peft = peft.get_peft_model(copy.deepcopy(self.model), peft.LoraConfig(**cfg), adapter_name=names[0])
        self.trees = {}
        for i, name in enumerate(names):
            if i:
                self.pm.add_adapter(name, funcpeft.LoraConfig(**cfg))
                self.peft.add_adapter(name, peft.LoraConfig(**cfg))
            self.trees[name] = random_like(self.pm.adapter, torch.Generator().manual_seed(i + 1))
            copy_into_peft(self.peft, self.trees[name], self.pm.plans[name], adapter_name=name)
        self.peft.eval()
        ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        for row in range(1, BATCH):
            mask[row, :row] = 0
            ids[row, :row] = 0
        self.kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": NEW, "do_sample": False}
        self.names = [names[i % ADAPTERS] for i in range(BATCH)]
        self.mixed = funcpeft.mixed_batch(self.trees, self.names)


def variants(fx: Fixture, decoder: funcpeft.Decoder) -> dict[str, dict[str, Callable[[], Any]]]:
    """Per measurement group, the interleaved variants (each returns the token ids)."""
    base, one, kw = fx.pm.base, fx.trees["a0"], fx.kw

    def peft_one() -> Any:
        fx.peft.set_adapter("a0")
        return fx.peft.generate(**kw)

    def peft_mixed() -> Any:
        return fx.peft.generate(**kw, adapter_names=fx.names)

    return {
        "one adapter": {
            "PEFT": peft_one,
            "PEFT" + AA: peft_one,
            "funcpeft eager": lambda: fx.pm.generate(base, one, **kw),
            "funcpeft compiled": lambda: decoder.generate(base, one, **kw),
        },
        "mixed batch": {
            "PEFT": peft_mixed,
            "PEFT" + AA: peft_mixed,
            "funcpeft eager": lambda: fx.pm.generate(base, fx.mixed, **kw),
            "funcpeft compiled": lambda: decoder.generate(base, fx.mixed, **kw),
        },
    }


def check_tokens(groups: dict[str, dict[str, Callable[[], Any]]]) -> list[str]:
    """Runs every variant once (the compiled ones compile here, timed); tokens must equal PEFT's for eager."""
    notes = []
    for group, vs in groups.items():
        want = vs["PEFT"]()
        eager = vs["funcpeft eager"]()
        if not torch.equal(eager, want):
            raise AssertionError(f"{group}: funcpeft's eager generate differs from PEFT's")
        start = time.perf_counter()
        compiled = vs["funcpeft compiled"]()
        first = time.perf_counter() - start
        same = torch.equal(compiled, eager)
        notes.append(
            f"{group}: eager tokens = PEFT's; compiled tokens {'=' if same else 'DIFFER FROM'} eager's "
            f"({(compiled != eager).sum().item()} of {compiled.numel()} differ); first compiled call (compile "
            f"included) {first:.1f} s"
        )
    return notes


def _cell(xs: list[float]) -> str:
    per_token = median(xs) / NEW * 1e3
    return f"{per_token:.3f} ms/token, {BATCH * NEW / median(xs):.0f} tok/s" + (
        f" (±{spread(xs) * 50:.0f}%)" if len(xs) >= 4 else ""
    )


def row(what: str, ours: list[float], ref: list[float], target: float | None) -> list[str]:
    r = paired_ratio(ours, ref)
    ci = paired_ratio_ci(ours, ref) if len(ours) >= 4 else None
    if target is None:
        verdict, goal = "-", "report"
    else:
        goal = f"<= {target:.2f}"
        verdict = "met" if r <= target else "parity (CI)" if ci is not None and ci[0] <= target else "MISSED"
    ratio = f"{r:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "")
    return [what, _cell(ours), "PEFT: " + _cell(ref), ratio, goal, verdict]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds per group (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="discarded rounds first (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the Decoder (default inductor)")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu (default): process CPU time, robust to other processes on a shared machine; wall: elapsed",
    )
    ap.add_argument("--no-warm-each", action="store_true", help="do not run each variant once untimed before timing")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warmup: a smoke run, numbers are rough")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"# funcpeft generation benchmark\n\nbefore: {machine_note()}")
    fx = Fixture()
    decoder = funcpeft.Decoder(fx.pm, backend=args.backend)
    groups = variants(fx, decoder)
    with torch.no_grad():
        notes = check_tokens(groups)
    print(
        f"Llama hidden {HIDDEN}, intermediate {INTERMEDIATE}, {LAYERS} layers, {HEADS} heads, vocab {VOCAB}, "
        f"attn={fx.model.config._attn_implementation}; batch {BATCH}, prompt {PROMPT} (left-padded), {NEW} new tokens, "
        f"greedy; LoRA r={RANK} alpha={ALPHA} all-linear, fp32; mixed batch: {ADAPTERS} adapters {fx.names}.\n"
        f"compiled: funcpeft.Decoder, backend {args.backend}.\n" + "\n".join(notes) + "\n"
        f"{args.clock} clock; rounds {args.rounds} (+{args.warmup} warmup), warm each: {not args.no_warm_each}; "
        "cells are median time per generated token (a call / 64) and tokens/s over the batch (± half IQR); ratio is "
        "the median of per-round ratios with a bootstrap 95% CI; PEFT (A/A): PEFT timed twice per round (noise).\n",
        flush=True,
    )
    timing = {"rounds": args.rounds, "warmup": args.warmup, "clock": args.clock, "warm_each": not args.no_warm_each}
    with torch.no_grad():
        times = {group: interleaved(vs, **timing) for group, vs in groups.items()}
    one, mixed = times["one adapter"], times["mixed batch"]
    rows = [
        row("generate, one adapter: funcpeft eager", one["funcpeft eager"], one["PEFT"], 1.00),
        row("generate, one adapter: funcpeft compiled", one["funcpeft compiled"], one["PEFT"], 0.60),
        row("generate, one adapter: noise floor (PEFT A/A)", one["PEFT" + AA], one["PEFT"], None),
        row(f"mixed batch of {ADAPTERS}: funcpeft eager", mixed["funcpeft eager"], mixed["PEFT"], 0.80),
        row(f"mixed batch of {ADAPTERS}: funcpeft compiled", mixed["funcpeft compiled"], mixed["PEFT"], None),
        row(f"mixed batch of {ADAPTERS}: noise floor (PEFT A/A)", mixed["PEFT" + AA], mixed["PEFT"], None),
    ]
    print(markdown_table(("measurement", "funcpeft", "reference", "ratio [95% CI]", "target", "verdict"), rows))
    print(f"\nafter: {machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
