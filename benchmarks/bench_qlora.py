"""QLoRA benchmark: a funcpeft training step on a 4-bit base vs PEFT's QLoRA on the same model (issue 14).

Shape: the core benchmark's Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000), saved once and
loaded twice through transformers' BitsAndBytesConfig (NF4, fp32 compute; every decoder linear layer 4-bit, the
embeddings and lm_head float) - one copy for funcpeft, one for PEFT - plus once in fp32 for the fp32 LoRA step;
batch 4 x 128; LoRA r=16 alpha=32 on all linear layers (28 modules), B non-zero, eval mode (no dropout).

    python benchmarks/bench_qlora.py                 # full run
    python benchmarks/bench_qlora.py --quick         # smoke run (numbers are rough)
    python benchmarks/bench_qlora.py --backend torchao   # int8 weights (torchao Int8Tensor, transformers' TorchAoConfig)
    python benchmarks/bench_qlora.py --backend hqq       # 4-bit HQQLinear layers (group 64), HQQ's default backend

Timing as in bench_core.py (interleaved rounds, process CPU time, 1 torch thread, each variant warmed right before
its timed call; the ratio is the median of per-round ratios with a bootstrap 95% CI; PEFT A/A is the noise floor).
Peak memory: tensor bytes allocated during one step above what existed before it (`_common.peak_memory`); the
4-bit base's packed weights exist before the step, so this is what a step adds (activations, the kernels'
dequantised weights, gradients). The model sizes line gives the resident weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
from _common import interleaved, machine_note, peak_memory, steady_malloc
from bench_core import AA, BATCH, RANK, SEQ, VOCAB, Table, build_llama, funcpeft_config, peft_config
from torch import nn

import funcpeft
from funcpeft.grad import value_and_grad
from funcpeft.testing import assert_trees_close, copy_into_peft, peft_grads, random_like


def load_4bit(path: Path) -> nn.Module:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    qc = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, device="cpu"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu").eval()


def load_torchao(path: Path) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import LlamaForCausalLM, TorchAoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qc = TorchAoConfig(Int8WeightOnlyConfig())
        return LlamaForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu").eval()


def load_hqq(path: Path) -> nn.Module:
    """Every decoder linear replaced by a 4-bit HQQLinear (transformers 5 cannot load HQQ models itself)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for name, module in list(model.model.layers.named_modules()):
            if isinstance(module, nn.Linear):
                layer = HQQLinear(
                    module, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
                )
                model.model.layers.set_submodule(name, layer)
    return model


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOADERS: dict[str, Callable[[Path], nn.Module]] = {"nf4": load_4bit, "torchao": load_torchao, "hqq": load_hqq}
DESCRIBED = {
    "nf4": "4-bit NF4 (bitsandbytes, fp32 compute)",
    "torchao": "int8 (torchao Int8WeightOnlyConfig)",
    "hqq": "4-bit HQQ (group 64)",
}


def _bytes(model: nn.Module) -> int:
    def size(p: torch.Tensor) -> int:
        if hasattr(p, "qdata"):  # a torchao Int8Tensor: its codes and scales
            return sum(t.numel() * t.element_size() for t in (p.qdata, p.scale))  # type: ignore[attr-defined]
        return p.numel() * p.element_size()

    return sum(size(p) for p in model.parameters())


class Fixture:
    """The 4-bit model twice (funcpeft, PEFT) with the same random non-zero adapter, and the fp32 model's LoRA."""

    def __init__(self, directory: Path, backend: str = "nf4"):
        import peft

        load = LOADERS[backend]
        fp32 = build_llama(512, 1376)
        fp32.save_pretrained(directory)
        self.sizes = {"fp32": _bytes(fp32)}
        # PEFT's "all-linear" matches nn.Linear and bitsandbytes layers, not HQQLinear: name them for HQQ
        targets = dict(target_modules=LINEARS) if backend == "hqq" else {}
        self.pm = funcpeft.get_peft_model(load(directory), dataclasses.replace(funcpeft_config(), **targets))
        self.sizes["quantised"] = _bytes(self.pm.model)
        plan = self.pm.plans[self.pm.adapter_name]
        if sum(e.spec is not None for e in plan.values()) != 28:
            raise RuntimeError("expected 28 LoRA modules on the benchmark Llama")
        self.adapter = random_like(self.pm.adapter, torch.Generator().manual_seed(1))
        self.peft = peft.get_peft_model(load(directory), dataclasses.replace(peft_config(), **targets)).eval()
        copy_into_peft(self.peft, self.adapter, plan)
        self.peft_params = [p for p in self.peft.parameters() if p.requires_grad]
        self.fp32 = funcpeft.get_peft_model(fp32, funcpeft_config())
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
        self.kw = {"input_ids": ids, "labels": ids}

    def loss(self, adapter: Any) -> torch.Tensor:
        return self.pm.fn(self.pm.base, adapter, **self.kw).loss

    def loss_fp32(self, adapter: Any) -> torch.Tensor:
        return self.fp32.fn(self.fp32.base, adapter, **self.kw).loss

    def zero_grads(self, *_: Any) -> None:
        for p in self.peft_params:
            p.grad = None

    def check_equal(self) -> float:
        """max |grad diff| funcpeft vs PEFT on the 4-bit model; raises if they disagree."""
        self.zero_grads()
        self.peft(**self.kw).loss.backward()
        _, grads = value_and_grad(self.loss)(self.adapter)
        want = peft_grads(self.peft, self.adapter, self.pm.plans[self.pm.adapter_name])
        assert_trees_close(grads, want, atol=1e-5)
        self.zero_grads()
        return max((a - b).abs().max().item() for a, b in zip(optree.tree_leaves(grads), optree.tree_leaves(want)))


def variants(fx: Fixture) -> dict[str, Callable[[], Any]]:
    vag, vag32 = value_and_grad(fx.loss), value_and_grad(fx.loss_fp32)

    def peft_step() -> None:
        fx.peft(**fx.kw).loss.backward()

    return {
        "PEFT": peft_step,
        "funcpeft": lambda: vag(fx.adapter),
        "funcpeft fp32 LoRA": lambda: vag32(fx.adapter),
        "PEFT" + AA: peft_step,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="discarded rounds first (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="cpu (default): process CPU time")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warmup: a smoke run, numbers are rough")
    ap.add_argument("--backend", choices=sorted(LOADERS), default="nf4", help="the quantised base (default nf4)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steady = steady_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# funcpeft QLoRA benchmark\n\nbefore: {machine_note()}")
    with tempfile.TemporaryDirectory() as tmp:
        fx = Fixture(Path(tmp), args.backend)
    grad_diff = fx.check_equal()
    print(
        f"Llama hidden 512, intermediate 1376, 4 layers, vocab {VOCAB}; decoder linears {DESCRIBED[args.backend]}; batch {BATCH}x{SEQ}; LoRA r={RANK} on 28 modules, eval mode. funcpeft vs PEFT: max |grad diff| "
        f"{grad_diff:.2g}. Weights: fp32 model {fx.sizes['fp32'] / 2**20:.1f} MiB, quantised model "
        f"{fx.sizes['quantised'] / 2**20:.1f} MiB.\n{args.clock} clock; rounds {args.rounds} (+{args.warmup} warmup); "
        f"malloc: {'steady (no trim)' if steady else 'system default'}.\n",
        flush=True,
    )
    vs = variants(fx)
    times = interleaved(vs, args.rounds, args.warmup, before=fx.zero_grads, clock=args.clock, warm_each=True)
    mem = {}
    for name, f in vs.items():
        fx.zero_grads()
        f()
        fx.zero_grads()
        mem[name] = peak_memory(f)
    table = Table()
    table.time("QLoRA train step", times["funcpeft"], times["PEFT"], 1.00, "PEFT QLoRA")
    table.time("QLoRA train step: noise floor (PEFT A/A)", times["PEFT" + AA], times["PEFT"], None, "PEFT QLoRA")
    table.memory("QLoRA train step peak memory", mem["funcpeft"], mem["PEFT"], 1.00, "PEFT QLoRA")
    table.time("QLoRA vs fp32 LoRA step time", times["funcpeft"], times["funcpeft fp32 LoRA"], None, "fp32 LoRA")
    table.memory("QLoRA vs fp32 LoRA step peak memory", mem["funcpeft"], mem["funcpeft fp32 LoRA"], None, "fp32 LoRA")
    print(table)
    resident = (fx.sizes["quantised"] + mem["funcpeft"]) / (fx.sizes["fp32"] + mem["funcpeft fp32 LoRA"])
    print(
        f"\nweights + step peak, QLoRA vs fp32 LoRA: {resident:.3f}\n"
        "The quantised base saves resident weight memory (sizes above); a step's own allocations are activations, "
        "logits and gradients plus the quantised kernel's dequantised weight, one layer at a time (transient).\n"
        f"after: {machine_note()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
