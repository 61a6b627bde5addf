"""A real `torchrun` launch: examples/train_fsdp.py (docs/distributed.md's FSDP2 recipe) on 2 gloo processes
writes the same PEFT files as the same training in one process on the full batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

pytestmark = pytest.mark.slow  # two process launches (CONTRIBUTING.md: the fast tier skips it)

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_fsdp.py"


def _run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent.parent)}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_torchrun_fsdp2_training_writes_the_single_process_files(tmp_path: Path) -> None:
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run([*torchrun, str(SCRIPT), "--out", str(sharded), "--steps", "3"])
    _run([sys.executable, str(SCRIPT), "--out", str(single), "--steps", "3", "--world-size-1-reference"])

    got = safetensors.torch.load_file(sharded / "adapter_model.safetensors")
    want = safetensors.torch.load_file(single / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and len(got) == 4 * 7 * 2  # 4 layers x 7 linear x (A, B)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
    # the adapter moved away from its start (so equality is not the trivial one of two untrained adapters)
    assert all(t.abs().max() > 0 for t in got.values())
    assert json.loads((sharded / "adapter_config.json").read_text()) == json.loads(
        (single / "adapter_config.json").read_text()
    )
    m_sharded = json.loads((sharded / "metrics.json").read_text())
    m_single = json.loads((single / "metrics.json").read_text())
    assert m_sharded["world_size"] == 2 and m_single["world_size"] == 1
    torch.testing.assert_close(torch.tensor(m_sharded["losses"]), torch.tensor(m_single["losses"]), atol=1e-5, rtol=0)
    assert m_sharded["base_bytes_whole"] == m_single["base_bytes_whole"]
    assert m_sharded["base_bytes_held"] * 2 == m_sharded["base_bytes_whole"]  # rank 0 holds half the base

    # PEFT reads the sharded run's files
    import peft

    from funcpeft import testing as T

    model = peft.PeftModel.from_pretrained(T.tiny_llama(layers=4), str(sharded))
    loaded = peft.get_peft_model_state_dict(model)
    for key in want:
        torch.testing.assert_close(loaded[key], got[key], atol=0, rtol=0, msg=key)
