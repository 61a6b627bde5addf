"""Session setup only: torch threads under xdist, hypothesis profiles, the fast tier's slow rule.

Helpers (tiny models and their inputs, the funcpeft-vs-PEFT pair builder, model snapshots) live in helpers.py.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from hypothesis import HealthCheck, settings

# Two xdist workers on 2 cores: one torch thread each, or they oversubscribe the CPU 3-4x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Hypothesis profiles (README "Tests"): CI must not depend on a random draw, local runs should explore.
#   ci       derandomized (the same examples on every run), no example database; chosen when CI=true
#   dev      random draws, the tests' own example counts (the default locally)
#   explore  random draws, 10x the examples (HYPOTHESIS_PROFILE=explore)
# Tests size their runs with helpers.examples(n), which scales n for the explore profile.
_COMMON: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("dev", **_COMMON)
settings.register_profile("explore", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

# The fast tier (`make test-fast`, -m "not slow") leaves out, besides tests marked slow where they are defined,
# what costs seconds per test by nature: torch.compile (tests named *compile*), thread stress tests (*thread*),
# and whole files of drawn or tabulated PEFT comparisons. `make test` (CI) runs everything.
SLOW_FILES = frozenset({"test_peft_matrix_data.py", "test_strategies.py"})
SLOW_NAME_PARTS = ("compile", "thread")


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        name = item.name.lower()
        if item.path.name in SLOW_FILES or any(part in name for part in SLOW_NAME_PARTS):
            item.add_marker("slow")
