"""Write the leave-one-family-out evaluation into the shipped model's metadata (issue 12, item 5).

What goes into models/weights/btd-ct-default.json:
- ``fusion``: the configuration chosen on ALL families of the selection patients (cues, rule, continuity
  spacing limit), the genuine tail models (train patients only) and the operating thresholds (genuine
  selection series only); the detector uses it (models.fused);
- ``references``: the per-scanner references fitted on the train patients' genuine slices;
- ``calibration``: slice / series thresholds become the fused REVIEW / SUSPICIOUS thresholds (the previous
  BTD-only values are kept under ``calibration.btd_only``);
- ``performance``: per family, the LEAVE-ONE-FAMILY-OUT figures on the test patients (never the best
  family, never the shipped configuration's own test figures alone); a family whose LOFO slice AUC is below
  0.6 or whose interval reaches 0.5 is written "not detected". The summary sentence goes into every SR.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from models.forensics.lofo_build import FAMILY_OF

DEFAULT_METADATA = Path(__file__).resolve().parents[1] / "weights" / "btd-ct-default.json"


def detected(block: dict[str, Any]) -> bool:
    auc, low = block.get("auc"), (block.get("auc_ci95") or [None])[0]
    return auc is not None and auc >= 0.6 and low is not None and low > 0.5


def summary_sentence(
    families: dict[str, Any], genuine: dict[str, Any], verdicts: dict[str, Any], date: str
) -> str:
    """The operating point in words for every SR: genuine flags, then each family's leave-one-family-out AUC
    and the share of its tampered slices the shipped thresholds actually catch (at least REVIEW). Why both:
    an AUC above chance with nothing caught at the operating point is not a detection a radiologist sees."""
    found = [f for f, b in families.items() if b["detected"]]
    missed = [f for f, b in families.items() if not b["detected"]]

    def fmt(f: str) -> str:
        b = families[f]
        return f"{f} AUC {b['lofo_auc']:.2f}, caught {b['tpr_at_review']:.0%} (n={b['n']})"

    return (
        f"Leave-one-family-out, test patients, tampered slices inside their series ({date}, "
        "docs/bench/forensics-lofo.md): "
        f"genuine slices flagged {genuine['flagged']} of {genuine['n']}; genuine series SUSPICIOUS "
        f"{verdicts['suspicious']} of {verdicts['n']}, "
        f"at least REVIEW {verdicts['at_least_review']} of {verdicts['n']}. "
        + ("Detected: " + "; ".join(fmt(f) for f in found) + ". " if found else "No family detected. ")
        + ("NOT detected: " + "; ".join(fmt(f) for f in missed) + ". " if missed else "")
        + "Single slices of a scanner/kernel without reference are not assessed. No evidence does not mean authentic."
    )


def performance_block(results: dict[str, Any], date: str) -> dict[str, Any]:
    lofo = results["lofo"]
    families = {}
    for family, block in sorted(lofo.items()):
        families[family] = {
            "group": FAMILY_OF.get(family, family),
            "lofo_auc": block["auc"],
            "lofo_auc_ci95": block["auc_ci95"],
            "n": block["n"],
            "n_genuine": block["n_genuine"],
            "tpr_at_review": block["tpr_at_review"],
            "detected": detected(block),
            "config": block["config"],
            "shipped_config_auc": results["shipped_test"][family]["auc"],
        }
    genuine = results["genuine_slices_flagged"]["test"]
    verdicts = results["series_verdicts"]["test"]["genuine"]
    summary = summary_sentence(families, genuine, verdicts, date)
    return {
        "date": date,
        "protocol": "leave-one-family-out; selection on train+validation patients, report on test patients",
        "families": families,
        "genuine_slices_flagged_test": genuine,
        "genuine_series_test": verdicts,
        "single_slice_test": results["single_slice"]["test"]["genuine"],
        "summary": summary,
    }


def ship(results_path: Path, date: str, metadata_path: Path = DEFAULT_METADATA) -> dict[str, Any]:
    results = json.loads(Path(results_path).read_text())
    metadata = json.loads(Path(metadata_path).read_text())
    config = results["shipped_config"]
    thresholds = results["thresholds"]
    limit = config.get("continuity_limit", 2.5)
    tails_series = {c: t for c, t in results["tails_in_series"].items() if c in config["cues"]}
    if "continuity" in config["cues"]:
        tails_series["continuity"] = results["tails_in_series"][f"continuity@{limit}"]
    tails_single = {c: t for c, t in results["tails_single"].items() if c in config["cues"]}
    metadata["fusion"] = {
        "cues": config["cues"],
        "rule": config["rule"],
        "continuity_limit_mm": config.get("continuity_limit", 2.5),
        "tails_in_series": tails_series,
        "tails_single": tails_single,
        "thresholds": {
            "review": thresholds["review"],
            "suspicious": thresholds["suspicious"],
            "single_review": thresholds.get("single_review", thresholds["review"]),
        },
        "min_series_slices": 8,
        "header_cue": True,
        "chosen": f"on all families of the selection patients ({results['shipped_name']}); "
        "tails on genuine train series; thresholds on genuine selection series",
    }
    metadata["references"] = results["references"]
    calibration = metadata.setdefault("calibration", {})
    if "btd_only" not in calibration:
        calibration["btd_only"] = {k: calibration.get(k) for k in ("slice_threshold", "series_threshold", "source")}
    calibration["slice_threshold"] = thresholds["review"]
    calibration["series_threshold"] = thresholds["suspicious"]
    calibration["source"] = (
        "fused cues (models.fused): REVIEW / SUSPICIOUS thresholds on the series-corrected fused score, set on "
        f"{thresholds['n_series']} genuine selection series ({thresholds['n_slices']} lung slices)"
    )
    metadata["performance"] = performance_block(results, date)
    Path(metadata_path).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return metadata


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--date", required=True)
    parser.add_argument("--metadata", type=Path, default=DEFAULT_METADATA)
    args = parser.parse_args()
    print(ship(args.results, args.date, args.metadata)["performance"]["summary"])
