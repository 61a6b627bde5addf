"""A save interrupted at any point never loads as a mix of two adapters.

Two adapters with the same shapes and different configs (lora_alpha 8 vs 16) are saved over each other.
A mix (new weights, old config) loads without complaint unless the save ties the files together, so
every test here checks: loading gives exactly the old adapter, exactly the new one, or raises
`InterruptedSaveError`, whose advice then recovers the new one; the next save leaves no temporary files.

- every step of a save (each write, fsync, rename, removal) is interrupted in turn: by a crash (a forked
  child that `os._exit`s at that step, no cleanup runs) and by an exception (the in-process cleanup runs);
- a child process saving the two adapters in a loop is SIGKILLed at seeded random moments.
"""

from __future__ import annotations

import builtins
import copy
import json
import multiprocessing
import os
import random
import re
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from helpers import MODELS

import funcpeft
import funcpeft.io as fio
from funcpeft import testing as T

TARGETS = ["q_proj", "v_proj"]
TEMP = re.compile(r"\.(adapter_model\.safetensors|adapter_config\.json)\.[0-9a-f]{32}\.tmp")


class Adapters:
    """OLD and NEW: one model, two LoRA adapters with equal shapes, different weights and lora_alpha."""

    def __init__(self, root: Path) -> None:
        self.model = MODELS["llama"]()
        self.fpms, self.trees = [], []
        for seed, alpha in ((1, 8), (2, 16)):
            fpm = funcpeft.get_peft_model(
                self.model, funcpeft.LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS)
            )
            self.fpms.append(fpm)
            self.trees.append(T.random_like(fpm.adapter, torch.Generator().manual_seed(seed)))
        self.expected = []  # what loading each one back gives: (tree, config dict)
        for i in (0, 1):
            d = root / f"reference{i}"
            self.save(i, d)
            self.expected.append(self.load(d))

    def save(self, which: int, directory: Path) -> None:
        self.fpms[which].save_pretrained(directory, self.trees[which])

    def load(self, directory: Path) -> tuple[dict, dict]:
        tree, config = funcpeft.load_adapter(directory, model=self.model)
        return tree, config.to_dict()

    def outcome(self, directory: Path, recovers_to: str | None = "new") -> str:
        """'old', 'new' or 'error' (InterruptedSaveError, whose advice is then followed: it must give
        `recovers_to`, or either adapter exactly if None); anything else fails."""
        try:
            tree, config = self.load(directory)
        except fio.InterruptedSaveError as e:
            temp = re.search(r"os\.replace\('([^']+)', '([^']+)'\)", str(e))
            assert temp is not None, f"the error does not say how to recover: {e}"
            assert str(directory) in str(e) and fio.WEIGHTS_NAME in str(e) and fio.CONFIG_NAME in str(e), str(e)
            os.replace(temp.group(1), temp.group(2))  # the recovery the message gives
            recovered = self.which(*self.load(directory))
            assert recovered == recovers_to or (recovers_to is None and recovered in ("old", "new")), recovered
            return "error"
        which = self.which(tree, config)
        assert which in ("old", "new"), f"{directory} loads as a mix of two adapters ({which})"
        return which

    def which(self, tree: dict, config: dict) -> str:
        same = [config == c and _equal(tree, t) for t, c in self.expected]
        return (
            "old"
            if same[0]
            else "new"
            if same[1]
            else f"weights {[_equal(tree, t) for t, _ in self.expected]}, "
            f"config {[config == c for _, c in self.expected]}"
        )


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) for k in a[p]) for p in a
    )


def _temps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if TEMP.fullmatch(n))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    return Adapters(tmp_path_factory.mktemp("references"))


# -- every step, in turn ---------------------------------------------------------------------------------------
class Steps:
    """Counts the file-system steps of a save in `directory` and interrupts step number `at` (None: never).

    Steps: writing the weights (safetensors save_file), opening a file for writing (the config), os.fsync,
    os.replace and os.remove. `how`: 'crash' = os._exit at the step (nothing after it runs), 'crash-midway'
    = a writer writes half its bytes then os._exit, 'raise' = an OSError at the step.
    """

    names: list[str]

    def __init__(self, directory: Path, at: int | None, how: str) -> None:
        self.directory, self.at, self.how, self.names = str(directory), at, how, []

    def _step(self, name: str, partial: Callable[[], None] | None = None) -> None:
        self.names.append(name)
        if len(self.names) - 1 != self.at:
            return
        if self.how == "raise":
            raise OSError(f"injected failure at step {self.at} ({name})")
        if self.how == "crash-midway" and partial is not None:
            partial()
        os._exit(0)

    def patches(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_save, real_open = fio.save_file, builtins.open
        real_fsync, real_replace, real_remove = os.fsync, os.replace, os.remove

        def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
            def half() -> None:
                real_save(tensors, filename, metadata=metadata)
                with real_open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)

            self._step("write weights", half)
            real_save(tensors, filename, metadata=metadata)

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, str) and file.startswith(self.directory) and any(c in mode for c in "wxa"):

                def half() -> None:
                    with real_open(file, "wb") as f:
                        f.write(b'{\n  "alpha_pattern": {},\n')

                self._step(f"open {os.path.basename(file)[:22]}.. for writing", half)
            return real_open(file, mode, *args, **kwargs)

        def fsync(fd: int) -> None:
            self._step("fsync")
            real_fsync(fd)

        def replace(src: Any, dst: Any) -> None:
            self._step(f"replace {os.path.basename(str(dst))}")
            real_replace(src, dst)

        def remove(path: Any) -> None:
            self._step(f"remove {os.path.basename(str(path))[:22]}..")
            real_remove(path)

        monkeypatch.setattr(fio, "save_file", save_file)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "remove", remove)


def _prepare(adapters: Adapters, directory: Path) -> None:
    """OLD saved, plus one stale temporary file of each kind (a save killed earlier), so cleanup steps count too."""
    adapters.save(0, directory)
    (directory / f".{fio.WEIGHTS_NAME}.{'a' * 32}.tmp").write_bytes(b"\0" * 64)
    (directory / f".{fio.CONFIG_NAME}.{'b' * 32}.tmp").write_bytes(b'{"peft_type": "LO')
    (directory / "README.md").write_text("user file")  # PEFT's layout: other files live in the directory too


def _save_new(adapters: Adapters, directory: Path, steps: Steps, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        steps.patches(m)
        adapters.save(1, directory)


def _count_steps(adapters: Adapters, directory: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    _prepare(adapters, directory)
    steps = Steps(directory, None, "crash")
    _save_new(adapters, directory, steps, monkeypatch)
    assert adapters.outcome(directory) == "new" and _temps(directory) == []
    return steps.names


def _in_child(fn: Callable[[], None]) -> None:
    """Run `fn` in a forked child; the child ends at its injected crash (or after fn, with status 0)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _check_after(adapters: Adapters, directory: Path) -> str:
    """The outcome; then the next save leaves no temporary files and the user's file alone."""
    outcome = adapters.outcome(directory)
    adapters.save(0, directory)
    assert _temps(directory) == [], "the next save did not remove the stale temporary files"
    assert (directory / "README.md").read_text() == "user file"
    assert adapters.outcome(directory) == "old"
    return outcome


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_crash_at_any_step_of_a_save_loads_old_or_new_or_says_so(
    adapters: Adapters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = _count_steps(adapters, tmp_path / "count", monkeypatch)
    assert {"replace adapter_model.safetensors", "replace adapter_config.json"} <= set(names)
    table = []
    for how in ("crash", "crash-midway"):
        for k, name in enumerate(names):
            if how == "crash-midway" and not name.startswith(("write", "open")):
                continue
            d = tmp_path / f"{how}-{k}"
            _prepare(adapters, d)
            _in_child(lambda: _save_new(adapters, d, Steps(d, k, how), monkeypatch))  # noqa: B023
            table.append((f"{how} at step {k}: {name}", _check_after(adapters, d)))
    print("\n".join(f"{step:60s} -> {outcome}" for step, outcome in table))
    crashes = "".join(outcome[0] for step, outcome in table[: len(names)])
    # the old adapter until the weights are moved into place, the error until the config is, then the new one
    assert re.fullmatch("o+e+n+", crashes), table


def test_a_failing_step_of_a_save_loads_old_or_new_or_says_so(
    adapters: Adapters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = _count_steps(adapters, tmp_path / "count", monkeypatch)
    seen = set()
    for k, name in enumerate(names):
        d = tmp_path / f"raise-{k}"
        _prepare(adapters, d)
        stale = set(_temps(d))
        try:
            _save_new(adapters, d, Steps(d, k, "raise"), monkeypatch)
        except OSError as e:
            assert f"step {k}" in str(e)
        left = set(_temps(d)) - stale
        outcome = adapters.outcome(d)  # follows the error's advice, which moves its temporary file away
        seen.add(outcome)
        # the failed save's own temporary files are gone, except the one an InterruptedSaveError points to
        assert len(left) == (outcome == "error"), (name, outcome, left)
        _check_after(adapters, d)
    assert {"old", "new", "error"} <= seen


def test_formatting_does_not_count_but_an_edit_does(adapters: Adapters, tmp_path: Path) -> None:
    """Line endings, indentation and key order (git autocrlf, a formatter) keep the pair; a changed value does not,
    and the error's snippet for a deliberate edit then loads the edited config."""
    adapters.save(1, tmp_path)
    path = tmp_path / fio.CONFIG_NAME
    data = json.loads(path.read_text())
    path.write_bytes(json.dumps(dict(reversed(data.items())), indent=4).replace("\n", "\r\n").encode())
    assert adapters.outcome(tmp_path) == "new"
    path.write_text(json.dumps({**data, "base_model_name_or_path": "my/local/copy"}, indent=2))
    with pytest.raises(fio.InterruptedSaveError, match="edited") as info:
        adapters.load(tmp_path)
    snippet = "\n".join(line[4:] for line in str(info.value).splitlines() if line.startswith("    "))
    exec(snippet, {})
    tree, config = adapters.load(tmp_path)
    assert config["base_model_name_or_path"] == "my/local/copy" and _equal(tree, adapters.expected[1][0])


# -- SIGKILL ---------------------------------------------------------------------------------------------------
def _save_loop(adapters: Adapters, directory: Path, ready: Any) -> None:
    torch.set_num_threads(1)
    for i in range(1_000_000):
        adapters.save(i % 2, directory)
        if i == 1:
            ready.set()


def _kill_moments(adapters: Adapters, directory: Path, n: int, seed: int) -> Iterator[float]:
    start = time.perf_counter()
    for i in range(6):
        adapters.save(i % 2, directory)
    per_save = (time.perf_counter() - start) / 6
    rng = random.Random(seed)
    for _ in range(n):
        yield rng.uniform(0, 2 * per_save)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_sigkill_during_a_save_loop_never_loads_a_mix(adapters: Adapters, tmp_path: Path) -> None:
    d = tmp_path / "adapter"
    ctx = multiprocessing.get_context("fork")
    outcomes, stale = [], 0
    for delay in _kill_moments(adapters, d, n=20, seed=20260509):
        ready = ctx.Event()
        child = ctx.Process(target=_save_loop, args=(adapters, d, ready))
        child.start()
        assert ready.wait(30), "the saving child did not start"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        assert child.exitcode == -signal.SIGKILL
        stale = max(stale, len(_temps(d)))
        outcomes.append(adapters.outcome(d, recovers_to=None))  # the loop saves both ways
    print(f"\noutcomes after {len(outcomes)} SIGKILLs: {outcomes}; at most {stale} stale temporary files")
    adapters.save(1, d)
    assert _temps(d) == [] and adapters.outcome(d) == "new"


def test_peft_reads_funcpeft_files_without_warnings(adapters: Adapters, tmp_path: Path) -> None:
    """The digest in the header is invisible to PEFT: loading our files warns exactly as loading PEFT's own."""
    adapters.save(1, tmp_path / "funcpeft")
    ref = peft.get_peft_model(
        copy.deepcopy(adapters.model), peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS)
    )
    T.copy_into_peft(ref, adapters.trees[1], adapters.fpms[1].plans["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(str(tmp_path / "peft"))
    caught = {}
    for which in ("peft", "funcpeft"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(adapters.model), tmp_path / which)
        caught[which] = sorted(f"{x.category.__name__}: {x.message}" for x in w)
    assert caught["funcpeft"] == caught["peft"]
    named = dict(pm.named_parameters())
    plan = adapters.fpms[1].plans["default"]
    for path, entry in adapters.trees[1].items():
        for key, value in entry.items():
            assert torch.equal(named[T.peft_param_name(path, key, plan[path])], value.detach())
    config = pm.peft_config["default"]
    assert isinstance(config, peft.LoraConfig) and config.lora_alpha == 16
