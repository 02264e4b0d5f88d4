"""The leave-one-family-out protocol: a held-out family's own figures never choose its configuration."""

from __future__ import annotations

import math

import pytest

from models.forensics.lofo import best_config, configurations, wilson
from models.forensics.lofo_build import FAMILY_OF, NEW_2D


def test_the_held_out_family_and_its_3d_form_never_choose() -> None:
    families = ["nps-nodule", "nps-nodule-3d", "transplant", "remove-exemplar"]
    select_auc = {
        # "tuned" wins only by being perfect on the nps family (both forms): the family it must not see
        "tuned": {"nps-nodule": 1.0, "nps-nodule-3d": 1.0, "transplant": 0.6, "remove-exemplar": 0.6},
        "general": {"nps-nodule": 0.5, "nps-nodule-3d": 0.5, "transplant": 0.8, "remove-exemplar": 0.8},
    }
    assert best_config(select_auc, families, None) == "tuned"  # on all families (the shipped choice)
    assert best_config(select_auc, families, FAMILY_OF["nps-nodule"]) == "general"
    assert best_config(select_auc, families, FAMILY_OF["nps-nodule-3d"]) == "general"
    assert best_config(select_auc, families, FAMILY_OF["transplant"]) == "tuned"
    with pytest.raises(ValueError):
        best_config(select_auc, ["nps-nodule"], FAMILY_OF["nps-nodule"])


def test_every_new_family_has_both_forms_in_one_group_and_the_grid_is_complete() -> None:
    for family in NEW_2D:
        assert FAMILY_OF[family] == FAMILY_OF[f"{family}-3d"] == family
    configs = configurations()
    assert len(configs) == 46  # 15 cue subsets x 2 rules, x 2 spacing limits where continuity is in
    assert all(c["cues"] for c in configs)


def test_wilson_interval() -> None:
    low, high = wilson(0, 145)
    assert low == 0.0 and 0.02 < high < 0.03
    assert all(math.isnan(v) for v in wilson(0, 0))
