"""PEFT's own custom-model matrix against funcpeft: every row whose config class funcpeft exports.

Each row runs the differential harness of tests/peft_matrix/harness.py (outputs, gradients, counts, files
both ways, merging; see `check_row`). KNOWN_FAILURES is the exact to-do list: each entry is strict xfail,
so a row that gets fixed fails here until it is removed, and its reason starts with the names of the
checks that fail (`check, check: why`), which must be exactly the failing ones. DEVIATIONS are rows where
PEFT itself is wrong and funcpeft deliberately differs; their gradients are checked against finite
differences of PEFT's forward instead (and the check fails if PEFT's gradients become right).
"""

from __future__ import annotations

from typing import Any

import pytest
from peft_matrix import cases, harness, models

import funcpeft

pytestmark = pytest.mark.slow  # `make test-fast` skips this file (CONTRIBUTING.md)


KNOWN_FAILURES: dict[str, str] = {}

# rows where PEFT is wrong: LoHa's use_effective_conv2d backward (HadaWeightCP) gives wrong gradients for
# hada_w1_a / hada_w2_a; lora.MultiheadAttention merges out_proj's delta twice, once outside autograd, so its
# out_proj gradients are half its forward's derivative. funcpeft's are autograd's (docs/usage.md "Limits")
DEVIATIONS: dict[str, str] = {
    **{
        name: "PEFT's hand-written LoHa use_effective_conv2d backward is wrong for hada_w1_a/hada_w2_a"
        for name in ("Conv2d 3 LOHA", "Conv2d 4 LOHA", "Conv1d LOHA 3")
    },
    **{
        name: "PEFT's lora.MultiheadAttention adds out_proj's delta a second time via `.data +=` (outside autograd)"
        for name in ("MHA 1 LoRA", "MHA 2 LoRA")
    },
}

KNOWN_MULTI_FAILURES: dict[str, str] = {}


# multi-adapter rows PEFT's test suite skips (`_skip_tests_with_multiple_adapters_with_target_parameters`) although
# PEFT 0.21.2 runs them: a second adapter on the same parameters reuses the ParamWrapper (checked like every row),
# one on different parameters is refused by `add_adapter` (funcpeft must refuse it with PEFT's error)
CHECKED_DESPITE_PEFT_SKIP = {"LoRA targeting nn.Parameter Same"}
REFUSED_BY_PEFT = {"LoRA targeting nn.Parameter Different"}


def _params(rows: tuple[Any, ...], known: dict[str, str]) -> list[Any]:
    out = []
    for row_id, case in zip(cases.case_ids(rows), rows):
        if getattr(funcpeft, case.config_cls, None) is None:
            continue
        marks = []
        if row_id in known:
            marks.append(pytest.mark.xfail(strict=True, raises=harness.RowMismatch, reason=known[row_id]))
        out.append(pytest.param(row_id, case, id=row_id, marks=marks))
    return out


def _expect(row_id: str, known: dict[str, str], run: Any) -> None:
    """Run the harness; a known failure must fail exactly in the checks its reason names."""
    try:
        notes = run()
    except harness.RowMismatch as e:
        if row_id in known:
            expected = known[row_id].split(": ", 1)[0].split(", ")
            if e.failed_checks != expected:
                raise AssertionError(
                    f"{row_id!r} fails in {e.failed_checks}, KNOWN_FAILURES says {expected}:\n{e}"
                ) from e
        raise
    assert isinstance(notes, list)


def test_known_failures_name_real_rows() -> None:
    ids, multi_ids = (
        set(cases.case_ids(cases.TEST_CASES)),
        set(cases.case_ids(cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)),
    )
    assert set(KNOWN_FAILURES) <= ids and set(DEVIATIONS) <= ids and set(KNOWN_MULTI_FAILURES) <= multi_ids
    assert not set(KNOWN_FAILURES) & set(DEVIATIONS)


@pytest.mark.parametrize(("row_id", "case"), _params(cases.TEST_CASES, KNOWN_FAILURES))
def test_row(row_id: str, case: cases.Case, tmp_path: Any) -> None:
    grads = "finite_differences" if row_id in DEVIATIONS else "autograd"
    _expect(row_id, KNOWN_FAILURES, lambda: harness.check_row(case, tmp_path, grads=grads))


@pytest.mark.parametrize(("row_id", "case"), _params(cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, KNOWN_MULTI_FAILURES))
def test_multi_row(row_id: str, case: cases.MultiCase, tmp_path: Any) -> None:
    if row_id in REFUSED_BY_PEFT:
        _check_both_refuse(case)
        return
    reason = harness.peft_skip_reason(case)
    if reason is not None and row_id not in CHECKED_DESPITE_PEFT_SKIP:
        pytest.skip(f"PEFT skips this row: {reason}")
    _expect(row_id, KNOWN_MULTI_FAILURES, lambda: harness.check_multi_row(case, tmp_path))


def _check_both_refuse(case: cases.MultiCase) -> None:
    """PEFT's add_adapter refuses the second adapter: funcpeft's raises the same error type and message."""
    import peft

    errors = []
    for lib in (peft, funcpeft):
        model = models.build_multi(case.tuner_method)
        pm = lib.get_peft_model(
            model, cases.build_config(lib, case.config_cls, case.config_kwargs_1), adapter_name="adapter_1"
        )
        with pytest.raises(Exception) as info:  # noqa: PT011 - compared with PEFT's below
            pm.add_adapter("adapter_2", cases.build_config(lib, case.config_cls, case.config_kwargs_2))
        errors.append((type(info.value), str(info.value)))
    assert errors[1] == errors[0]


def test_multi_skips_are_real() -> None:
    """The overrides above name rows PEFT's suite really skips."""
    rows = {r.name: r for r in cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES}
    for row_id in CHECKED_DESPITE_PEFT_SKIP | REFUSED_BY_PEFT:
        assert harness.peft_skip_reason(rows[row_id]) is not None


# -- the harness can fail ------------------------------------------------------------------------------------
def _row(name: str) -> cases.Case:
    return next(c for c in cases.TEST_CASES if c.name == name)


def test_harness_reports_a_wrong_adapter_value(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A funcpeft that loads one leaf slightly wrong fails forward, grads, save and PEFT's reload, named."""
    real = funcpeft.from_pretrained

    def off_by_a_little(*args: Any, **kwargs: Any) -> Any:
        fpm = real(*args, **kwargs)
        leaf = next(iter(next(iter(fpm.adapter.values())).values()))
        leaf.data.add_(1e-3)
        return fpm

    monkeypatch.setattr(funcpeft, "from_pretrained", off_by_a_little)
    with pytest.raises(harness.RowMismatch) as e:
        harness.check_row(_row("Vanilla MLP 4 LoRA"), tmp_path)
    assert e.value.failed_checks == ["forward", "grads", "save", "peft_loads_funcpeft", "merge"]
    assert "base_model.model.lin0.lora_A.weight: values differ" in str(e.value)


def test_harness_reports_wrong_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(funcpeft.FunctionalPeftModel, "get_nb_trainable_parameters", lambda self, adapter=None: (1, 2))
    with pytest.raises(harness.RowMismatch) as e:
        harness.check_row(_row("Vanilla MLP 1 IA3"), tmp_path)
    assert e.value.failed_checks == ["get_peft_model", "counts"]
    assert "get_nb_trainable_parameters() = (1, 2), PEFT (20, " in str(e.value)


def test_finite_differences_mode_catches_wrong_gradients(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """On a row where PEFT's gradients are right, the finite-difference mode says the deviation is obsolete;
    with funcpeft's gradients scaled it reports them."""
    with pytest.raises(harness.RowMismatch, match="PEFT's own gradients now agree with finite differences"):
        harness.check_row(_row("Conv2d 1 LOHA"), tmp_path / "a", grads="finite_differences")
    real = funcpeft.value_and_grad

    def doubled(fn: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            loss, grads = real(fn)(*args)
            return loss, {p: {n: 2 * g for n, g in e.items()} for p, e in grads.items()}

        return wrapped

    monkeypatch.setattr(funcpeft, "value_and_grad", doubled)
    with pytest.raises(harness.RowMismatch, match="gradients disagree with finite differences of PEFT's forward"):
        harness.check_row(_row("Conv2d 3 LOHA"), tmp_path / "b", grads="finite_differences")
