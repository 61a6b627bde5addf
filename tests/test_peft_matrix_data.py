"""The data of tests/peft_matrix: PEFT's custom-model matrix, transcribed completely and runnable by PEFT itself.

The per-class counts were read from PEFT's tests/test_custom_models.py at `cases.PEFT_REVISION`
(331 rows of TEST_CASES over 35 config classes, 66 rows of MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES).
"""

from __future__ import annotations

import collections
import copy
import warnings

import peft
import pytest
import torch
from peft_matrix import cases, harness, models

# PEFT's TEST_CASES: rows per config class
PEFT_TEST_CASES_PER_CLASS = {
    "AdaLoraConfig": 4,
    "AdamssConfig": 7,
    "BOFTConfig": 12,
    "BeftConfig": 5,
    "C3AConfig": 6,
    "DeftConfig": 9,
    "DeloraConfig": 5,
    "FourierFTConfig": 6,
    "FrodConfig": 5,
    "GloraConfig": 6,
    "GraloraConfig": 8,
    "HRAConfig": 5,
    "HiraConfig": 14,
    "IA3Config": 22,
    "LNTuningConfig": 5,
    "LilyConfig": 5,
    "LoHaConfig": 20,
    "LoKrConfig": 23,
    "LoraConfig": 46,
    "MissConfig": 8,
    "OFTConfig": 17,
    "OSFConfig": 2,
    "PeanutConfig": 5,
    "PsoftConfig": 10,
    "PveraConfig": 6,
    "RandLoraConfig": 7,
    "RoadConfig": 6,
    "ShiraConfig": 5,
    "SupertuningConfig": 5,
    "TinyLoraConfig": 8,
    "TrainableTokensConfig": 1,
    "UniLoraConfig": 6,
    "VBLoRAConfig": 6,
    "VeraConfig": 6,
    "WaveFTConfig": 20,
}
# PEFT's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES: rows per config class
PEFT_MULTI_CASES_PER_CLASS = {
    "AdaLoraConfig": 2,
    "AdamssConfig": 2,
    "BOFTConfig": 2,
    "BeftConfig": 2,
    "C3AConfig": 1,
    "DeftConfig": 2,
    "DeloraConfig": 2,
    "FourierFTConfig": 2,
    "FrodConfig": 1,
    "GloraConfig": 2,
    "GraloraConfig": 2,
    "HRAConfig": 2,
    "HiraConfig": 2,
    "IA3Config": 2,
    "LilyConfig": 2,
    "LoHaConfig": 2,
    "LoKrConfig": 2,
    "LoraConfig": 6,
    "MissConfig": 2,
    "OFTConfig": 2,
    "PeanutConfig": 2,
    "PsoftConfig": 2,
    "PveraConfig": 1,
    "RandLoraConfig": 1,
    "RoadConfig": 4,
    "ShiraConfig": 2,
    "SupertuningConfig": 2,
    "TinyLoraConfig": 2,
    "UniLoraConfig": 1,
    "VBLoRAConfig": 2,
    "VeraConfig": 1,
    "WaveFTConfig": 4,
}


def test_row_counts_match_peft() -> None:
    assert len(cases.TEST_CASES) == 331
    assert len(PEFT_TEST_CASES_PER_CLASS) == 35
    assert dict(collections.Counter(c.config_cls for c in cases.TEST_CASES)) == PEFT_TEST_CASES_PER_CLASS
    assert len(cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES) == 66
    got = collections.Counter(c.config_cls for c in cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
    assert dict(got) == PEFT_MULTI_CASES_PER_CLASS


def test_rows_are_well_formed() -> None:
    for case in cases.TEST_CASES:
        assert isinstance(case, cases.Case) and case.model_id in models.MODELS, case
        assert isinstance(case.config_kwargs, dict), case
    for multi in cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES:
        assert isinstance(multi, cases.MultiCase), multi
        assert isinstance(multi.config_kwargs_1, dict) and isinstance(multi.config_kwargs_2, dict), multi
    tables: tuple[tuple[cases.Case | cases.MultiCase, ...], ...] = (
        cases.TEST_CASES,
        cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
    )
    for rows in tables:
        ids = cases.case_ids(rows)
        assert len(set(ids)) == len(ids) == len(rows)
        assert sum(i != c.name for i, c in zip(ids, rows)) == len(rows) - len({c.name for c in rows})


def test_build_config_gives_each_library_its_own_objects() -> None:
    row = next(c for c in cases.TEST_CASES if c.name == "Vanilla MLP 10 LoRA with VeLoRA random")
    config = cases.build_config(peft, row.config_cls, row.config_kwargs)
    assert isinstance(config, peft.LoraConfig) and isinstance(config.velora_config, peft.VeloraConfig)
    assert config.velora_config.num_groups == 2
    import funcpeft

    ours = cases.build_config(funcpeft, row.config_cls, row.config_kwargs)  # funcpeft gets the dict, and converts it
    assert isinstance(ours.velora_config, funcpeft.VeloraConfig) and ours.velora_config.num_groups == 2
    # every matrix class is implemented: a config class funcpeft lacks (one of PEFT's, or a made-up name) is refused
    lacking = [n for n in dir(peft) if n.endswith("Config") and n[0].isupper() and not hasattr(funcpeft, n)]
    missing = (lacking or ["NoSuchMethodConfig"])[0]
    assert not hasattr(funcpeft, missing)
    with pytest.raises(AttributeError, match=f"funcpeft has no config class {missing}"):
        cases.build_config(funcpeft, missing, {})


def test_build_is_peft_seeded_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b = models.build("Conv2d"), models.build("Conv2d")
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    torch.manual_seed(0)  # PEFT's MockTransformerWrapper.from_pretrained
    assert all(torch.equal(p, q) for p, q in zip(models.ModelConv2D().parameters(), a.parameters()))
    assert not torch.equal(
        models.build("Conv2d", seed=1).get_parameter("conv2d.weight"), a.get_parameter("conv2d.weight")
    )
    assert models.build("MLP", dtype=torch.bfloat16).get_parameter("lin0.weight").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model_id nope not implemented"):
        models.build("nope")


@pytest.mark.parametrize("case", cases.TEST_CASES, ids=cases.case_ids(cases.TEST_CASES))
def test_every_row_runs_in_peft(case: cases.Case) -> None:
    model = models.build(case.model_id)
    x = models.inputs(case.model_id)
    with torch.no_grad():
        base_out = model.eval()(**x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(model), cases.build_config(peft, case.config_cls, case.config_kwargs))
    assert type(pm.peft_config["default"]).__name__ == case.config_cls
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pm.eval()(**x)
    assert out.shape == base_out.shape and torch.isfinite(out).all()
    assert pm.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize(
    "case", cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, ids=cases.case_ids(cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
)
def test_every_multi_row_builds_in_peft(case: cases.MultiCase) -> None:
    reason = harness.peft_skip_reason(case)
    if reason is not None:
        pytest.skip(f"PEFT skips this row: {reason}")
    model = models.build_multi(case.tuner_method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(
            model, cases.build_config(peft, case.config_cls, case.config_kwargs_1), adapter_name="adapter_1"
        )
        pm.add_adapter("adapter_2", cases.build_config(peft, case.config_cls, case.config_kwargs_2))
    assert set(pm.peft_config) == {"adapter_1", "adapter_2"}
    with torch.no_grad():
        out = pm.eval()(**models.inputs("EmbConv1D" if case.tuner_method == "lora+trainable_tokens" else "MLP"))
    assert torch.isfinite(out).all()
