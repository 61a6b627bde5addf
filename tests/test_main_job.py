"""The main job (`make run`): a real LoRA fine-tune of all-MiniLM-L6-v2 on the shipped topic data, run small."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import funcpeft
from funcpeft.testing import assert_trees_close

pytestmark = pytest.mark.slow  # `make test-fast` skips this file (CONTRIBUTING.md)

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune_minilm.py"
STEPS, RANK = 30, 4


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_minilm", SCRIPT)
    assert spec is not None and spec.loader is not None, SCRIPT
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> Any:
    return _load_script()


def test_main_job_end_to_end(script: Any, tmp_path: Path) -> None:
    """One run (it is the expensive part; one test so that xdist never runs it twice), every check on it."""
    threads = torch.get_num_threads()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each
        torch.set_num_threads(1)
    try:
        run = script.main(
            [
                "--steps",
                str(STEPS),
                "--rank",
                str(RANK),
                "--lr",
                "5e-3",
                "--seed",
                "0",
                "--output-dir",
                str(tmp_path),
                "--no-progress",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    check_accuracy_clearly_improves(run)
    check_loss_curve_png(run)
    check_adapter_in_peft_format(run)
    check_saved_tree_is_the_trained_tree(run)
    check_reloads_give_identical_predictions(run)


def test_main_job_quantize_4bit(script: Any, tmp_path: Path) -> None:
    """`--quantize 4bit`: MiniLM's linear layers in 4-bit NF4 (bitsandbytes) + LoRA; accuracy still clearly
    improves, and PEFT and funcpeft reload the adapter onto a fresh 4-bit model with the same predictions."""
    pytest.importorskip("bitsandbytes")
    threads = torch.get_num_threads()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    try:
        argv = ["--steps", str(STEPS), "--rank", str(RANK), "--lr", "5e-3", "--seed", "0", "--quantize", "4bit"]
        run = script.main([*argv, "--output-dir", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    # every encoder linear layer (6 layers x q, k, v, attention output, intermediate, output) and the pooler
    assert len(run["quantized_weights"]) == 6 * 6 + 1, run["quantized_weights"][:3]
    check_accuracy_clearly_improves(run)
    check_adapter_in_peft_format(run)
    check_reloads_give_identical_predictions(run)


def check_accuracy_clearly_improves(run: dict[str, Any]) -> None:
    before, after = run["accuracy_before"], run["accuracy_after"]
    assert before < 0.5, f"an untrained 4-way head should be near chance (25%), got {before:.1%}"
    assert after >= 0.8 and after >= before + 0.4, f"accuracy {before:.1%} -> {after:.1%} is not clearly better"
    losses = run["losses"]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], f"training loss did not fall: {losses[0]:.3f} -> {losses[-5:]}"


def check_loss_curve_png(run: dict[str, Any]) -> None:
    png = Path(run["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    assert png.stat().st_size > 5_000, "the PNG is too small to hold a plot"


def check_adapter_in_peft_format(run: dict[str, Any]) -> None:
    adapter_dir = Path(run["adapter_dir"])
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["r"] == RANK
    assert sorted(config["target_modules"]) == ["query", "value"]  # PEFT's default for BERT
    keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    want = {
        f"base_model.model.bert.encoder.layer.{layer}.attention.self.{proj}.{ab}.weight"
        for layer in range(6)
        for proj in ("query", "value")
        for ab in ("lora_A", "lora_B")
    }  # MiniLM-L6
    want |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}  # SEQ_CLS head: saved whole
    assert keys == want, f"missing {sorted(want - keys)[:3]}, unexpected {sorted(keys - want)[:3]}"


def check_saved_tree_is_the_trained_tree(run: dict[str, Any]) -> None:
    tree, config = funcpeft.load_adapter(run["adapter_dir"])
    assert isinstance(config, funcpeft.LoraConfig) and config.r == RANK
    assert_trees_close(tree, {p: {k: v.detach() for k, v in e.items()} for p, e in run["adapter"].items()}, atol=0)


def check_reloads_give_identical_predictions(run: dict[str, Any]) -> None:
    reloaded = run["reloaded_logits"]
    assert set(reloaded) == {"funcpeft", "peft"}  # peft is a test dependency: both loaders must have run
    for who, logits in reloaded.items():
        assert torch.equal(logits.argmax(-1), run["logits"].argmax(-1)), f"{who} predicts differently after reload"
        torch.testing.assert_close(logits, run["logits"], atol=1e-5, rtol=0, msg=who)
    assert all(run["same_predictions"].values())


def test_help_names_every_flag(script: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--rank", "--lr", "--output-dir", "--seed", "--batch-size", "--max-length", "--quantize"):
        assert flag in text
    assert "outputs/minilm-topics" in text  # the default output directory is shown


@pytest.mark.parametrize(
    "argv, wanted",
    [
        (["--steps", "0"], "--steps must be a positive"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--rank", "x"], "invalid int value"),
    ],
)
def test_bad_flags_are_rejected_clearly(
    script: Any, capsys: pytest.CaptureFixture[str], argv: list[str], wanted: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    assert wanted in capsys.readouterr().err


def test_read_topics_rejects_a_file_without_the_header(script: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("train\tsports\tA sentence.\n")
    with pytest.raises(ValueError, match="header"):
        script.read_topics(bad)
