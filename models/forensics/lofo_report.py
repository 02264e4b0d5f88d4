"""The leave-one-family-out results as Markdown tables (docs/bench/forensics-lofo.md is written from them)."""

from __future__ import annotations

from typing import Any


def _ci(values: list | None) -> str:
    if not values or values[0] is None:
        return "[-]"
    return f"[{values[0]:.2f}, {values[1]:.2f}]"


def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Shipped configuration (chosen on all families, selection patients): **{results['shipped_name']}**; "
        f"thresholds REVIEW {results['thresholds']['review']}, SUSPICIOUS {results['thresholds']['suspicious']} "
        f"(set on {results['thresholds']['n_series']} genuine selection series, "
        f"{results['thresholds']['n_slices']} lung slices).",
        "",
    ]
    lines += [
        "### In series, leave-one-family-out (test patients)",
        "",
        "| family | n slices | LOFO slice AUC [95% CI] | TPR at REVIEW [95% CI] | top region on the edit "
        "(flagged) | config chosen without this family | shipped config's AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, b in results["lofo"].items():
        shipped = results["shipped_test"][family]
        lines.append(
            f"| {family} | {b['n']} | {_f(b['auc'])} {_ci(b['auc_ci95'])} | {_f(b['tpr_at_review'])} "
            f"{_ci(b['tpr_ci95'])} | {_f(b['hit_rate_flagged'])} (of {b['n_flagged']}) | {b['config']} | "
            f"{_f(shipped['auc'])} |"
        )
    lines += ["", "### Each cue alone (slice AUC, in series; selection / test patients)", ""]
    families = list(results["lofo"])
    lines.append("| cue | " + " | ".join(families) + " |")
    lines.append("|---|" + "---|" * len(families))
    for name, roles in results["cue_alone"].items():
        cells = [f"{_f(roles['select'].get(f))} / {_f(roles['test'].get(f))}" for f in families]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, title in (
        ("single_slice", "shipped references (fitted on the train patients)"),
        (
            "single_slice_site",
            "a site reference for exactly this scanner (simulated: the other genuine slices of the series)",
        ),
    ):
        lines += [
            "",
            f"### Single-slice series, test patients, against {title}",
            "",
            "| family | n assessed | n not assessed | slice AUC [95% CI] | TPR at REVIEW |",
            "|---|---|---|---|---|",
        ]
        single = results[name]["test"]
        g = single["genuine"]
        lines.append(
            f"| genuine | {g['n']} | {g['not_assessed']} | flagged {g['flagged']} {_ci(g['flagged_ci95'])} | - |"
        )
        for family, b in single["families"].items():
            lines.append(
                f"| {family} | {b['n']} | {b['n_not_assessed']} | {_f(b['auc'])} {_ci(b['auc_ci95'])} | "
                f"{_f(b['tpr_at_review'])} |"
            )
    lines += [
        "",
        "### Genuine slices over the REVIEW threshold per scanner key (both roles)",
        "",
        "| scanner key | patients | in series: flagged / n [95% CI] | single slice, shipped references: "
        "flagged / n (not assessed) | single slice, site reference: flagged / n [95% CI] |",
        "|---|---|---|---|---|",
    ]
    single_by_key = results["genuine_by_key_single"]
    site_by_key = results["genuine_by_key_single_site"]
    for key, b in results["genuine_by_key_in_series"].items():
        s = single_by_key.get(key, {})
        t = site_by_key.get(key, {})
        lines.append(
            f"| {key} | {', '.join(b['patients'])} | {b['flagged']} / {b['n']} {_ci(b['rate_ci95'])} | "
            f"{s.get('flagged', '-')} / {s.get('n', '-')} ({s.get('not_assessed', '-')}) | "
            f"{t.get('flagged', '-')} / {t.get('n', '-')} {_ci(t.get('rate_ci95'))} |"
        )
    lines += [
        "",
        "### Series verdicts (shipped configuration)",
        "",
        "| role | series | n | SUSPICIOUS [95% CI] | at least REVIEW [95% CI] | not assessed |",
        "|---|---|---|---|---|---|",
    ]
    for role, block in results["series_verdicts"].items():
        rows = [("genuine", block["genuine"])] + list(block["families"].items())
        for name, v in rows:
            lines.append(
                f"| {role} | {name} | {v['n']} | {v['suspicious']} {_ci(v['suspicious_ci95'])} | "
                f"{v['at_least_review']} {_ci(v['at_least_review_ci95'])} | {v['not_assessed']} |"
            )
    lines += [
        "",
        "### Seconds per slice (this shared 2-core CPU, 1 thread; 512 x 512 unless the series is smaller)",
        "",
        "| part | median | 90th percentile | n |",
        "|---|---|---|---|",
    ]
    for part, t in results["timing_seconds_per_slice"].items():
        lines.append(f"| {part} | {_f(t['median'], 3)} | {_f(t['p90'], 3)} | {t['n']} |")
    return "\n".join(lines) + "\n"
