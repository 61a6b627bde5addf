"""Differential checks of ONE row of PEFT's matrix: funcpeft against PEFT 0.21.2, through funcpeft's public API only.

No name mapping between the libraries: PEFT's model is given random adapter values and saved with
PEFT's `save_pretrained`; funcpeft loads those files (`funcpeft.from_pretrained`), and everything is
compared in PEFT's own terms — model outputs, gradients keyed like PEFT's checkpoint (funcpeft's via
`funcpeft.io.checkpoint_state`, PEFT's via `get_peft_model_state_dict` on a model holding its grads),
parameter counts, files, merged models.

`check_row(case, tmp)` runs every check of a `cases.Case` and raises one `RowMismatch` listing each
failing check with its reason; `check_multi_row(case, tmp)` does the same for a `cases.MultiCase` (two
adapters active at once). `peft_skip_reason(...)` / `peft_merge_skip_reason(...)` are PEFT's own skips.

Tolerances: outputs and merged outputs `max|f - p| <= 1e-5 * max(1, max|p|)` (plain 1e-5 for the log-prob
sized outputs of almost every row; relative for the few models whose outputs are huge), gradients the same
rule per tensor; files bitwise.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import peft
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

import funcpeft
import funcpeft.io
from funcpeft._trees import SHARED_PREFIX
from funcpeft.methods.base import Method

from . import models
from .cases import Case, MultiCase, build_config

RTOL = 1e-5
PERTURB_SEED = 1234
LOSS_SEED = 7
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class RowMismatch(AssertionError):
    """funcpeft disagrees with PEFT on a row: one line per failing check, `check: reason`.

    `failed_checks`: the names of the failing checks, in the order they ran.
    """

    def __init__(self, message: str, failed_checks: list[str]) -> None:
        super().__init__(message)
        self.failed_checks = failed_checks


# -- PEFT's own skips ---------------------------------------------------------------------------------------
def peft_merge_skip_reason(model_id: str, config_cls: str, config_kwargs: Mapping[str, Any]) -> str | None:
    """PEFT's `_skip_if_merging_not_supported` (testing_common.py) for the classes it names."""
    if config_kwargs.get("alora_invocation_tokens") is not None:
        return "Test not applicable for Activated LoRA"
    if config_cls == "OSFConfig":
        return "OSF adapter merge/unload are not implemented"
    if model_id.startswith("Conv2dGroups") and config_cls == "LoraConfig":
        return "Merging conv layers with groups>1 and LoRA is not supported."
    if config_cls == "LilyConfig":
        return "Lily does not support merging adapters"
    return None


def peft_skip_reason(case: MultiCase) -> str | None:
    """PEFT's `_skip_tests_with_multiple_adapters_with_target_parameters` for a multi-adapter row."""
    if case.config_cls == "LoraConfig" and case.config_kwargs_2.get("target_parameters"):
        return "LoRA with multiple adapters with target_parameters is not supported"
    if case.config_cls == "AdaLoraConfig":
        return "AdaLoRA only supports a single trainable adapter"
    return None


# -- helpers ------------------------------------------------------------------------------------------------
class _Checks:
    """Runs named checks, keeps going after a failure, raises them all at the end."""

    def __init__(self, row: str) -> None:
        self.row = row
        self.failures: list[tuple[str, str]] = []
        self.notes: list[str] = []

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure of a check is a finding to report
            self.failures.append((name, _describe(e)))

    def fatal(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            self.failures.append((name, _describe(e)))
            self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.failures:
            lines = "\n  ".join(f"{name}: {why}" for name, why in self.failures)
            raise RowMismatch(f"row {self.row!r}:\n  {lines}", [name for name, _ in self.failures])


def _describe(e: BaseException) -> str:
    if isinstance(e, AssertionError):
        return str(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn()


def _tensor(out: Any) -> torch.Tensor:
    """A model's output as one tensor (transformers models return a ModelOutput: its logits)."""
    return out.logits if hasattr(out, "logits") else out


def _close(what: str, got: Any, want: Any) -> None:
    got, want = _tensor(got), _tensor(want)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != PEFT's {tuple(want.shape)}")
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(want).all():
        raise AssertionError(f"{what}: PEFT's value is not finite (cannot compare)")
    diff = (got - want).abs()
    tol = RTOL * max(1.0, want.abs().max().item()) if want.numel() else 0.0
    if not torch.isfinite(got).all() or (diff.numel() and diff.max().item() > tol):
        where = int(diff.nan_to_num(float("inf")).argmax()) if diff.numel() else 0
        raise AssertionError(
            f"{what}: max |funcpeft - PEFT| = {diff.nan_to_num(float('inf')).max().item():.3g} > {tol:.3g} "
            f"(flat index {where}: funcpeft {got.flatten()[where].item():.8g}, PEFT {want.flatten()[where].item():.8g})"
        )


def _close_dicts(what: str, got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    if set(got) != set(want):
        raise AssertionError(
            f"{what}: keys differ; only funcpeft: {sorted(set(got) - set(want))}, only PEFT: {sorted(set(want) - set(got))}"
        )
    problems = []
    for k in sorted(want):
        try:
            _close(k, got[k], want[k])
        except AssertionError as e:
            problems.append(str(e))
    if problems:
        raise AssertionError(f"{what}: " + "; ".join(problems))


def _same_files(what: str, got_dir: str, want_dir: str, set_fields: set[str]) -> None:
    """Safetensors keys, dtypes and values bitwise equal; adapter_config.json equal as parsed JSON."""
    got, want = load_file(os.path.join(got_dir, WEIGHTS)), load_file(os.path.join(want_dir, WEIGHTS))
    problems = []
    if set(got) != set(want):
        problems.append(f"keys: only funcpeft {sorted(set(got) - set(want))}, only PEFT {sorted(set(want) - set(got))}")
    for k in sorted(set(got) & set(want)):
        if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape:
            problems.append(f"{k}: {got[k].dtype} {list(got[k].shape)} != PEFT's {want[k].dtype} {list(want[k].shape)}")
        elif not torch.equal(got[k], want[k]):
            problems.append(f"{k}: values differ (max {(got[k].double() - want[k].double()).abs().max().item():.3g})")
    with open(os.path.join(got_dir, CONFIG)) as f:
        got_cfg = json.load(f)
    with open(os.path.join(want_dir, CONFIG)) as f:
        want_cfg = json.load(f)
    for cfg in (got_cfg, want_cfg):  # PEFT writes its set-valued fields in set (hash) order
        for k in set_fields:
            if isinstance(cfg.get(k), list):
                cfg[k] = sorted(cfg[k], key=repr)
    for k in sorted(set(got_cfg) | set(want_cfg)):
        if k not in want_cfg:
            problems.append(f"{CONFIG}[{k!r}] only in funcpeft's")
        elif k not in got_cfg:
            problems.append(f"{CONFIG}[{k!r}] missing (PEFT: {want_cfg[k]!r})")
        elif got_cfg[k] != want_cfg[k]:
            problems.append(f"{CONFIG}[{k!r}] = {got_cfg[k]!r}, PEFT {want_cfg[k]!r}")
    if problems:
        raise AssertionError(f"{what}: " + "; ".join(problems))


def _set_fields(config: Any) -> set[str]:
    return {k for k, v in vars(config).items() if isinstance(v, set)}


def _perturb(model: nn.Module, seed: int) -> None:
    """Every trainable PEFT parameter moved off its init: p + s * N(0, 1), s = 0.1 * max(rms(p), 0.5).

    Additive adapters (zero-initialised B, ...) get non-trivial values; multiplicative ones (IA3's ones,
    DoRA's magnitude) stay near their init, so the model's outputs stay of the same size.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                rms = p.float().pow(2).mean().sqrt().item() if p.numel() else 0.0
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
                p.add_(noise * (0.1 * max(rms, 0.5)))


def _loss_weights(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(LOSS_SEED), dtype=torch.float32).to(out.dtype)


def _loss(out: Any) -> torch.Tensor:
    out = _tensor(out)
    return (out * _loss_weights(out)).sum()


def _peft_grads(
    pm: nn.Module, adapter_names: list[str], x: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's gradients keyed like its checkpoint: `get_peft_model_state_dict` while each param holds its grad."""
    pm.zero_grad(set_to_none=True)
    _loss(pm(**x)).backward()
    trainable = [p for p in pm.parameters() if p.requires_grad]
    saved = [p.data for p in trainable]
    try:
        with torch.no_grad():
            for p in trainable:
                p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        return {
            n: {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm, adapter_name=n).items()}
            for n in adapter_names
        }
    finally:
        with torch.no_grad():
            for p, d in zip(trainable, saved):
                p.data = d
        pm.zero_grad(set_to_none=True)


def _checkpoint_directions(
    pm: nn.Module, seed: int
) -> Iterator[tuple[nn.Parameter, torch.Tensor, dict[str, torch.Tensor]]]:
    """For each trainable PEFT parameter: a random direction, and that direction keyed like PEFT's checkpoint.

    The keyed form is `get_peft_model_state_dict` while the parameter holds the direction and every other
    trainable parameter holds zeros, restricted to the keys that changed: no name mapping needed.
    """
    g = torch.Generator().manual_seed(seed)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    saved = [p.data for p in trainable]

    def keyed(values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            with torch.no_grad():
                for p, v in zip(trainable, values):
                    p.data = v
                return {k: t.detach().clone() for k, t in get_peft_model_state_dict(pm).items()}
        finally:
            with torch.no_grad():
                for p, d in zip(trainable, saved):
                    p.data = d

    zeros = [torch.zeros_like(p) for p in trainable]
    at_zero = keyed(zeros)
    for i, p in enumerate(trainable):
        v = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        state = keyed([v if j == i else z for j, z in enumerate(zeros)])
        yield p, v, {k: t for k, t in state.items() if not torch.equal(t, at_zero[k])}


def _check_grads_by_finite_differences(
    pm: nn.Module,
    x: Mapping[str, torch.Tensor],
    got: Mapping[str, torch.Tensor],
    peft_autograd: Mapping[str, torch.Tensor],
    eps: float = 1e-3,
    atol: float = 1e-2,
    rtol: float = 2e-2,
) -> list[str]:
    """funcpeft's gradients against central differences of PEFT's FORWARD, one random direction per parameter.

    For rows where PEFT's hand-written backward is wrong (its forward is right). float32 differences, so the
    tolerance is loose (|fd - g.v| <= atol + rtol * max(|fd|, |g.v|)), far below the errors it is meant to
    catch. Returns the checkpoint keys where PEFT's own autograd gradient fails the same test.
    """
    wrong_in_peft: list[str] = []
    problems: list[str] = []
    for p, v, keyed in _checkpoint_directions(pm, PERTURB_SEED + 1):
        with torch.no_grad():
            p0 = p.data.clone()
            p.data = p0 + eps * v
            plus = _loss(pm(**x)).double().item()
            p.data = p0 - eps * v
            minus = _loss(pm(**x)).double().item()
            p.data = p0
        fd = (plus - minus) / (2 * eps)
        for who, grads, out in (("funcpeft", got, problems), ("PEFT", peft_autograd, wrong_in_peft)):
            missing = [k for k in keyed if k not in grads]
            if missing:
                raise AssertionError(f"{who}'s gradients have no entry for {missing}")
            dot = sum((grads[k].double() * keyed[k].double()).sum().item() for k in keyed)
            if abs(dot - fd) > atol + rtol * max(abs(fd), abs(dot)):
                out.append(f"{sorted(keyed)}: {who} g.v = {dot:.5g}, finite difference {fd:.5g}")
    if problems:
        raise AssertionError("gradients disagree with finite differences of PEFT's forward: " + "; ".join(problems))
    return wrong_in_peft


def _stdout(fn: Callable[[], Any]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def _check_counts(pm: peft.PeftModel, fpm: Any, adapter: Any = None) -> None:
    got, want = fpm.get_nb_trainable_parameters(adapter), pm.get_nb_trainable_parameters()
    if tuple(got) != tuple(want):
        raise AssertionError(f"get_nb_trainable_parameters() = {tuple(got)}, PEFT {tuple(want)}")
    got_line, want_line = (
        _stdout(lambda: fpm.print_trainable_parameters(adapter)),
        _stdout(pm.print_trainable_parameters),
    )
    if got_line != want_line:
        raise AssertionError(f"print_trainable_parameters: {got_line!r} != PEFT {want_line!r}")


# -- one row ------------------------------------------------------------------------------------------------
def check_row(case: Case, tmp: str | os.PathLike, seed: int = 0, grads: str = "autograd") -> list[str]:
    """All checks of one `Case`; returns notes (e.g. PEFT's merge skip), raises `RowMismatch` on any failure.

    grads: "autograd" compares with PEFT's gradients; "finite_differences" is for rows where PEFT's backward
        is known to be wrong: funcpeft's gradients are checked against central differences of PEFT's forward,
        and the check fails if PEFT's own gradients pass that test (the deviation would be obsolete).

    get_peft_model: the row's kwargs build `funcpeft.<config_cls>`; `funcpeft.get_peft_model` counts like
        PEFT and saving the loaded values through it writes PEFT's files (same keys, bitwise tensors, JSON);
        per-layer buffers (state, not values of the tree) are PEFT's.
    from_pretrained: funcpeft loads PEFT's files (fatal: the checks below need it).
    forward, grads: eval outputs and the gradients of a fixed random-weighted loss, per checkpoint key.
    counts: `get_nb_trainable_parameters` and the `print_trainable_parameters` line.
    save: funcpeft's `save_pretrained` of what it loaded == PEFT's files.
    peft_loads_funcpeft: `peft.PeftModel.from_pretrained` on funcpeft's files gives PEFT's outputs.
    merge: `funcpeft.merge_and_unload` vs PEFT's `merge_and_unload` outputs (unless PEFT skips or refuses).
    """
    if grads not in ("autograd", "finite_differences"):
        raise ValueError(f"grads must be 'autograd' or 'finite_differences', got {grads!r}")
    tmp = os.fspath(tmp)
    checks = _Checks(case.name)
    x = models.inputs(case.model_id)
    model = models.build(case.model_id, seed)

    def peft_side() -> nn.Module:
        torch.manual_seed(seed)
        pm = peft.get_peft_model(copy.deepcopy(model), build_config(peft, case.config_cls, case.config_kwargs))
        _perturb(pm, PERTURB_SEED)
        return pm.eval()

    pm = _quiet(peft_side)
    peft_dir = os.path.join(tmp, "peft")
    _quiet(lambda: pm.save_pretrained(peft_dir))
    set_fields = _set_fields(pm.peft_config["default"])
    with torch.no_grad():
        want = pm(**x)

    with checks.check("get_peft_model"):
        fconfig = build_config(funcpeft, case.config_cls, case.config_kwargs)
        direct = _quiet(lambda: funcpeft.get_peft_model(copy.deepcopy(model), fconfig))
        _check_counts(pm, direct)
        loaded, _ = _quiet(lambda: funcpeft.load_adapter(peft_dir, model=model, is_trainable=True))
        # per-layer frozen tensors PEFT saves (VeLoRA's projection, ...) are state funcpeft keeps in `base`, not
        # tree values: the files are written with PEFT's (from_pretrained's base), not the fresh model's
        method = funcpeft.methods.method_for(fconfig)
        frozen = method.layer_frozen.names if isinstance(method, Method) and method.layer_frozen is not None else ()
        state = {
            k: v
            for k, v in _quiet(lambda: funcpeft.from_pretrained(copy.deepcopy(model), peft_dir)).base.items()
            if k.startswith(SHARED_PREFIX) and any(k.endswith(f".{n}") for n in frozen)
        }
        out_dir = os.path.join(tmp, "funcpeft_direct")
        _quiet(lambda: direct.save_pretrained(out_dir, loaded, base_params={**direct.base, **state}))
        _same_files("files saved by get_peft_model(row config)", out_dir, peft_dir, set_fields)

    fmodel = copy.deepcopy(model)
    fpm = checks.fatal(
        "from_pretrained", lambda: _quiet(lambda: funcpeft.from_pretrained(fmodel, peft_dir, is_trainable=True))
    )
    fn, base, adapter = fpm

    with checks.check("forward"):
        _close("eval output", _quiet(lambda: fn(base, adapter, **x)), want)

    with checks.check("grads"):
        want_grads = _quiet(lambda: _peft_grads(pm, ["default"], x))["default"]
        _, tree = _quiet(lambda: funcpeft.value_and_grad(lambda a: _loss(fn(base, a, **x)))(adapter))
        got_grads = funcpeft.io.checkpoint_state(tree, fpm.peft_config["default"], fmodel, base_params=base)
        if grads == "autograd":
            _close_dicts("gradients by checkpoint key", got_grads, want_grads)
        else:
            if set(got_grads) != set(want_grads):
                raise AssertionError(f"gradient keys differ: funcpeft {sorted(got_grads)}, PEFT {sorted(want_grads)}")
            wrong = _quiet(lambda: _check_grads_by_finite_differences(pm, x, got_grads, want_grads))
            if not wrong:
                raise AssertionError("PEFT's own gradients now agree with finite differences: compare with autograd")
            checks.notes.append("PEFT's autograd gradients disagree with finite differences: " + "; ".join(wrong))

    with checks.check("counts"):
        _check_counts(pm, fpm)

    f_dir = os.path.join(tmp, "funcpeft")
    with checks.check("save"):
        _quiet(lambda: fpm.save_pretrained(f_dir, adapter))
        # the reference is PEFT's own load -> save (PEFT re-applies task-type defaults on load, e.g. SEQ_CLS
        # appends ["classifier", "score"] to modules_to_save again)
        resaved = os.path.join(tmp, "peft_resaved")
        _quiet(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(model), peft_dir).save_pretrained(resaved))
        _same_files("files saved by funcpeft", f_dir, resaved, set_fields)

    with checks.check("peft_loads_funcpeft"):
        if not os.path.isdir(f_dir):
            raise AssertionError("funcpeft wrote no files (see save)")
        back = _quiet(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(model), f_dir).eval())
        with torch.no_grad():
            _close("output of PEFT on funcpeft's files", back(**x), want)

    reason = peft_merge_skip_reason(case.model_id, case.config_cls, case.config_kwargs)
    if reason is None:
        try:
            with torch.no_grad():
                merged_want = _quiet(lambda: copy.deepcopy(pm).merge_and_unload()(**x))
        except Exception as e:  # noqa: BLE001 - PEFT refusing to merge this row is PEFT's skip
            reason = f"PEFT's merge_and_unload raises {_describe(e)}"
    if reason is None:
        with checks.check("merge"):
            merged = _quiet(lambda: funcpeft.merge_and_unload(fpm, adapter))
            with torch.no_grad():
                _close("merged model output", merged.eval()(**x), merged_want)
    else:
        checks.notes.append(f"merge not checked: {reason}")
    checks.raise_if_failed()
    return checks.notes


def check_multi_row(case: MultiCase, tmp: str | os.PathLike, seed: int = 0) -> list[str]:
    """All checks of one `MultiCase`: adapters "adapter_1" and "adapter_2" (PEFT's names), both active.

    PEFT: `get_peft_model(model, config_1, adapter_name="adapter_1")`, `add_adapter("adapter_2", config_2)`,
    both set active on every layer, random values, `save_pretrained` (one directory per adapter).
    funcpeft: `from_pretrained(dir, "adapter_1")`, `add_adapter("adapter_2", load_adapter(dir, "adapter_2")'s config)`.
    Checks each adapter alone and both together (forward), the combined gradients, counts with both
    active, each adapter's files saved back by funcpeft, and merging both.
    """
    tmp = os.fspath(tmp)
    checks = _Checks(case.name)
    model_id = "EmbConv1D" if case.tuner_method == "lora+trainable_tokens" else "MLP"
    x = models.inputs(model_id)
    model = models.build_multi(case.tuner_method, seed)
    names = ["adapter_1", "adapter_2"]

    def set_active(pm: nn.Module, active: list[str]) -> None:
        # PEFT's test helper: set_adapter on every tuner layer (PeftModel.set_adapter takes one name)
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper

        for module in pm.modules():
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                module.set_adapter(active)

    def peft_side() -> nn.Module:
        torch.manual_seed(seed)
        pm = peft.get_peft_model(
            copy.deepcopy(model), build_config(peft, case.config_cls, case.config_kwargs_1), adapter_name=names[0]
        )
        pm.add_adapter(names[1], build_config(peft, case.config_cls, case.config_kwargs_2))
        set_active(pm, names)  # makes both adapters' parameters trainable, so both get perturbed
        _perturb(pm, PERTURB_SEED)
        return pm.eval()

    pm = _quiet(peft_side)
    peft_dir = os.path.join(tmp, "peft")
    _quiet(lambda: pm.save_pretrained(peft_dir))
    set_fields = [_set_fields(pm.peft_config[n]) for n in names]
    with torch.no_grad():
        want_both = pm(**x)

    fmodel = copy.deepcopy(model)

    def funcpeft_side() -> tuple[Any, dict[str, Any]]:
        # the save root: a non-default adapter lives in root/<name>/ (PEFT's layout), found by name
        fpm = funcpeft.from_pretrained(fmodel, peft_dir, names[0], is_trainable=True)
        tree2, config2 = funcpeft.load_adapter(peft_dir, names[1], model=fmodel, is_trainable=True)
        fpm.add_adapter(names[1], config2)
        return fpm, {names[0]: fpm.adapter, names[1]: tree2}

    fpm, trees = checks.fatal("from_pretrained + load_adapter", lambda: _quiet(funcpeft_side))
    fn, base, _ = fpm

    with checks.check("forward (both active)"):
        _close("eval output, both adapters", _quiet(lambda: fn(base, trees, **x)), want_both)

    with checks.check("grads (both active)"):
        want_grads = _quiet(lambda: _peft_grads(pm, names, x))
        _, grads = _quiet(lambda: funcpeft.value_and_grad(lambda t: _loss(fn(base, t, **x)))(trees))
        for n in names:
            got = funcpeft.io.checkpoint_state(grads[n], fpm.peft_config[n], fmodel, base_params=base, adapter_name=n)
            _close_dicts(f"gradients of {n} by checkpoint key", got, want_grads[n])

    with checks.check("counts (both active)"):
        _check_counts(pm, fpm, trees)

    with checks.check("save"):
        for n, fields in zip(names, set_fields):
            out = funcpeft.save_adapter(
                os.path.join(tmp, "funcpeft"), trees[n], fpm.peft_config[n], n, model=fmodel, base_params=base
            )
            _same_files(f"files of {n} saved by funcpeft", out, os.path.join(peft_dir, n), fields)

    reason = peft_merge_skip_reason(case.name, case.config_cls, case.config_kwargs_1)  # PEFT passes the test name
    if reason is None:
        try:
            with torch.no_grad():
                merged_want = _quiet(lambda: copy.deepcopy(pm).merge_and_unload(adapter_names=names)(**x))
        except Exception as e:  # noqa: BLE001
            reason = f"PEFT's merge_and_unload raises {_describe(e)}"
    if reason is None:
        with checks.check("merge (both)"):
            merged = _quiet(lambda: funcpeft.merge_and_unload(fpm, trees))
            with torch.no_grad():
                _close("merged model output, both adapters", merged.eval()(**x), merged_want)
    else:
        checks.notes.append(f"merge not checked: {reason}")

    for n in names:  # last: set_adapter changes which PEFT parameters are trainable
        with checks.check(f"forward ({n} alone)"):
            pm.set_adapter(n)
            with torch.no_grad():
                want_one = pm(**x)
            _close(f"eval output, {n} alone", _quiet(functools.partial(fn, base, {n: trees[n]}, **x)), want_one)
    checks.raise_if_failed()
    return checks.notes
