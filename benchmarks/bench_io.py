"""Adapter files benchmark: funcpeft vs PEFT saving and loading a ~1,000-tensor adapter (issue 3, "Files").

Shape: LlamaForCausalLM hidden 64, intermediate 128, 72 layers, vocab 128; LoRA r=8 on all linear layers
(504 modules -> 1,008 tensors), fp32, random non-zero values. Both libraries run interleaved in one
process on the same model and adapter values; medians over rounds and paired funcpeft/PEFT ratios.

    save: `fpm.save_pretrained(dir)` (atomic, fsync'd by default; also timed with fsync=False) vs PEFT's
          `save_pretrained(dir)` (which also writes a README model card).
    load: `funcpeft.from_pretrained(model, dir)` vs `peft.PeftModel.from_pretrained(model, dir)` on the
          directory PEFT wrote (PEFT modifies its model, so it gets a fresh copy per call, made untimed).

    python benchmarks/bench_io.py                # ~1 minute on 2 cores
    python benchmarks/bench_io.py --rounds 5     # quicker, rougher
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from typing import Any

import torch
from _common import fmt_ms, interleaved, machine_note, markdown_table, median, paired_ratio, spread
from torch import nn

import funcpeft
from funcpeft.testing import assert_trees_close, copy_into_peft, random_like

LAYERS, HIDDEN, RANK = 72, 64, 8


def build_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def main() -> None:
    import peft

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    model = build_llama()
    config: dict[str, Any] = dict(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**config))
    adapter = random_like(fpm.adapter, torch.Generator().manual_seed(0))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    copy_into_peft(pm, adapter, fpm.plans["default"])
    n_tensors = sum(len(e) for e in adapter.values())

    with tempfile.TemporaryDirectory() as root:
        f_dir, p_dir = f"{root}/funcpeft", f"{root}/peft"
        fpm.save_pretrained(f_dir, adapter)
        pm.save_pretrained(p_dir)
        # both loaders read PEFT's files and agree before anything is timed
        assert_trees_close(funcpeft.from_pretrained(model, p_dir).adapter, adapter, atol=0)
        assert_trees_close(funcpeft.from_pretrained(model, f_dir).adapter, adapter, atol=0)

        save = interleaved(
            {
                "funcpeft save": lambda: fpm.save_pretrained(f_dir, adapter),
                "funcpeft save (fsync=False)": lambda: fpm.save_pretrained(f_dir, adapter, fsync=False),
                "peft save": lambda: pm.save_pretrained(p_dir),
            },
            args.rounds,
            args.warmup,
        )
        fresh: list[nn.Module] = []

        def before(name: str) -> None:
            fresh.clear()
            if name == "peft load":
                fresh.append(copy.deepcopy(model))

        load = interleaved(
            {
                "funcpeft load": lambda: funcpeft.from_pretrained(model, p_dir),
                "peft load": lambda: peft.PeftModel.from_pretrained(fresh[0], p_dir),
            },
            args.rounds,
            args.warmup,
            before=before,
        )

    rows = []
    for times, ref in ((save, "peft save"), (load, "peft load")):
        for name, ts in times.items():
            ratio = "1.00x" if name == ref else f"{paired_ratio(ts, times[ref]):.2f}x"
            rows.append([name, fmt_ms(median(ts)), f"{spread(ts):.0%}", ratio])
    print(
        f"Llama {LAYERS} layers, hidden {HIDDEN}, LoRA r={RANK} all-linear: {n_tensors} adapter tensors; "
        f"{args.rounds} interleaved rounds (+{args.warmup} warm-up), wall clock"
    )
    print(machine_note())
    print(markdown_table(["variant", "median", "IQR/median", "funcpeft / PEFT (paired median)"], rows))


if __name__ == "__main__":
    main()
