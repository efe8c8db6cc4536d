"""The paper's numbers (Moskalev et al., TAG-ML 2023), for the side-by-side tables and the cards.

Table 1 is Transforming-MNIST, 4 seeds. The drift and sigma_max values are read off Figures 4 and 5 (approximate,
as DESIGN section 5 quotes them); ``None`` where the paper gives no number we can quote.
"""

from __future__ import annotations

TABLE1: dict[tuple[str, str], dict[str, float]] = {
    ("R4", "WT"): {"accuracy": 94.6, "LI": 0.00, "DI": 0.0, "SI": 1.00},
    ("R4", "DA"): {"accuracy": 94.0, "LI": 98.6, "DI": 0.3, "SI": 0.17},
    ("R4", "IR"): {"accuracy": 87.9, "LI": 0.02, "DI": 0.0, "SI": 0.95},
    ("T3", "WT"): {"accuracy": 96.6, "LI": 0.0, "DI": 0.0, "SI": 1.00},
    ("T3", "DA"): {"accuracy": 96.2, "LI": 50.8, "DI": 0.1, "SI": 0.57},
    ("T3", "IR"): {"accuracy": 93.1, "LI": 0.01, "DI": 0.0, "SI": 0.95},
}

#: DI at beta = 0.5 of the drift toward the second data set (Fig. 4; Fashion-MNIST in the paper).
DRIFT_DI_AT_HALF: dict[tuple[str, str], float] = {
    ("R4", "WT"): 0.0, ("R4", "DA"): 4.7, ("R4", "IR"): 0.0,
    ("T3", "WT"): 0.0, ("T3", "DA"): 2.0, ("T3", "IR"): 0.0,
}

#: sigma_max of the input-output Jacobian (Fig. 5); the paper reports DA and the LI-regularized model.
SIGMA_MAX: dict[tuple[str, str], float | None] = {
    ("R4", "WT"): None, ("R4", "DA"): 10.0, ("R4", "IR"): 3.0,
    ("T3", "WT"): None, ("T3", "DA"): 10.0, ("T3", "IR"): 0.6,
}

CITATION = ("A. Moskalev, A. Sepliarskaia, E. J. Bekkers, A. Smeulders. On genuine invariance learning without "
            "weight-tying. TAG-ML workshop, ICML 2023, PMLR 221:218-227.")


def paper_numbers(group: str, model: str) -> dict:
    key = (group, model)
    return {
        "table1": TABLE1.get(key),
        "drift_DI_at_beta_0.5": DRIFT_DI_AT_HALF.get(key),
        "sigma_max": SIGMA_MAX.get(key),
        "data": "Transforming-MNIST (full MNIST), Fashion-MNIST as the drift target, 4 seeds",
        "citation": CITATION,
    }
