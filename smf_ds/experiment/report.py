"""The experiment's report: a markdown table of every variant against the base model, a plot of
task gain against forgetting with each method's frontier, and the matched-gain tables
(results.json -> report.md, tradeoff.png)."""
from __future__ import annotations

from pathlib import Path

from .frontier import FORGETTING_SIGN, method_of

TASK_LABELS = {"medmcqa": "MedMCQA acc", "wikitext": "WikiText ppl", "triviaqa": "TriviaQA acc"}
EXTRA_LABELS = {"wikitext_memorised": "memorised ppl"}  # smf_ds.experiment.stats.EXTRA_COLUMNS
MEMORISED_NOTE = [
    "The synthetic world's probes read text its base model never pretrained on: WikiText held-out "
    "articles, TriviaQA held-out phrasings of the questions (the facts are taught in the other "
    "phrasings). `memorised ppl` is the perplexity on the windows of the articles the base did "
    "pretrain on: recall of memorised text.", ""]
LOWER_IS_BETTER = {"wikitext"}


def _signed(x: float) -> str:
    """3 decimals; changes under 0.01 in 2 significant digits, so a starred interval never reads 0."""
    if abs(x) < 1e-12:  # float noise of a mean of equal values
        return f"{0.0:+.3f}"
    return f"{x:+.3f}" if abs(x) >= 0.01 else f"{x:+.1e}"


def _delta_cell(delta: dict) -> str:
    lo, hi = delta["ci95"]
    mark = "" if lo <= 0 <= hi else " *"
    if not delta.get("same_sign_on_every_base", True):
        mark += " ~"
    return f"{_signed(delta['value'])} [{_signed(lo)}, {_signed(hi)}]{mark}"


def _mean_sd_cell(metric: dict, n_seeds: int) -> str:
    # one seed has no spread: "± 0.000" would read as a measured sd of zero
    return f"{metric['mean']:.3f} ± {metric['sd']:.3f}" if n_seeds > 1 else f"{metric['mean']:.3f} ± -"


def results_table(results: dict) -> str:
    labels = {**TASK_LABELS, **{c: label for c, label in EXTRA_LABELS.items() if c in results["base"]}}
    tasks = list(labels)
    head = ["variant", "seeds"] + [f"{labels[t]} (mean ± sd)" for t in tasks] + [f"Δ {labels[t]} [95% CI]" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| base | - | " + " | ".join(f"{results['base'][t]:.3f}" for t in tasks) + " |" + " - |" * len(tasks))
    for name, row in results["variants"].items():
        cells = [name, str(len(row["seeds"]))]
        cells += [_mean_sd_cell(row[t], len(row["seeds"])) for t in tasks]
        cells += [_delta_cell(row[t]["delta"]) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_colours(methods: list[str]) -> dict[str, tuple]:
    """One colour per method, distinct up to 20 (the sweep's and the ablation's together are 17)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: palette(i % palette.N) for i, m in enumerate(methods)}


def plot_tradeoff(results: dict, path: Path) -> Path:
    """Task gain (y) against each probe's change (x), one point per variant with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    methods = list(dict.fromkeys(map(method_of, variants)))
    colours = method_colours(methods)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, probe in zip(axes, ("triviaqa", "wikitext")):
        labelled = set()
        for name, row in variants.items():
            method_name = method_of(name)
            dx, dy = row[probe]["delta"], row["medmcqa"]["delta"]
            xerr = [[dx["value"] - dx["ci95"][0]], [dx["ci95"][1] - dx["value"]]]
            yerr = [[dy["value"] - dy["ci95"][0]], [dy["ci95"][1] - dy["value"]]]
            ax.errorbar(dx["value"], dy["value"], xerr=xerr, yerr=yerr, fmt="o", capsize=3, color=colours[method_name],
                        label=None if method_name in labelled else method_name)
            labelled.add(method_name)
        for method, front in results.get("tradeoffs", {}).get(probe, {}).get("frontiers", {}).items():
            if len(front) > 1:  # a method's frontier through its sweep's points
                ax.plot([variants[v][probe]["delta"]["value"] for v in front],
                        [variants[v]["medmcqa"]["delta"]["value"] for v in front], "-", color=colours[method], lw=1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        worse = "right" if probe in LOWER_IS_BETTER else "left"
        ax.set_xlabel(f"Δ {TASK_LABELS[probe]} vs base (forgetting to the {worse})")
        ax.set_ylabel(f"Δ {TASK_LABELS['medmcqa']} vs base")
    axes[0].legend(fontsize=8)
    fig.suptitle("Task gain against forgetting (mean over seeds, paired bootstrap 95% CI; lines: frontiers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _matched_cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    interval = entry["ci95"]
    cell = f"{_signed(entry['value'])} [{_signed(interval[0])}, {_signed(interval[1])}]" if interval else _signed(entry["value"])
    return cell + (f" ({entry['reached']:.0%} of resamples)" if entry["reached"] < 0.95 else "")


def matched_tables(results: dict) -> list[str]:
    """Per probe: forgetting at matched task gain, and task gain at matched forgetting (markdown)."""
    lines = []
    for probe, sign in FORGETTING_SIGN.items():
        tradeoff = results.get("tradeoffs", {}).get(probe)
        if not tradeoff:
            continue
        frontiers = list(tradeoff["frontiers"])
        forgetting = f"{'-' if sign < 0 else '+'}Δ {TASK_LABELS[probe]}"
        for key, level_name, value_name in (("matched_gain", f"Δ {TASK_LABELS['medmcqa']}", f"forgetting ({forgetting})"),
                                            ("matched_forgetting", f"forgetting ({forgetting})", f"Δ {TASK_LABELS['medmcqa']}")):
            rows = tradeoff[key]
            # the methods with a value at some level (a frontier of one point has none)
            methods = [m for m in frontiers if any(m in row["methods"] for row in rows)]
            if not rows:
                continue
            lines += [f"**{value_name} at matched {level_name}** ({TASK_LABELS[probe]} probe)", "",
                      "| " + " | ".join([level_name, *methods]) + " |", "|" + "---|" * (len(methods) + 1)]
            lines += ["| " + " | ".join([_signed(row["level"]), *(_matched_cell(row["methods"].get(m)) for m in methods)])
                      + " |" for row in rows]
            lines.append("")
    if lines:
        lines = ["## Matched gain and matched forgetting", "",
                 "Each method's value is read off its frontier (its sweep points that no other of its points "
                 "beats) by linear interpolation, at levels two or more frontiers reach; the interval repeats "
                 "that on every paired bootstrap resample (a share under 95% means the frontier did not "
                 "always reach the level). `-`: the method's frontier does not reach it.", "", *lines]
    return lines


def _ablation_cell(entry: dict) -> str:
    interval = entry["ci95"]
    if not interval:
        return _signed(entry["value"])
    mark = (" *" if entry["beyond"] else "") + ("" if entry.get("same_sign_on_every_base", True) else " ~")
    return f"{_signed(entry['value'])} [{_signed(interval[0])}, {_signed(interval[1])}]{mark}"


def ablation_table(results: dict) -> list[str]:
    """smf-paper's corrections, one row each: its change of every metric against smf-paper (markdown)."""
    found = results.get("ablation")
    if not found:
        return []
    tasks = list(TASK_LABELS)
    head = ["correction", "corrects", *(f"Δ {TASK_LABELS[t]} vs {found['reference']} [95% CI]" for t in tasks),
            "changes beyond its interval"]
    lines = ["## Ablation: the paper code's procedure, one difference corrected at a time", "",
             f"`{found['reference']}` trains as the paper's code does (docs/paper.md); each row corrects one of its "
             "differences and nothing else. Δ is the mean over seeds of (correction - "
             f"{found['reference']}) on the same examples, with a paired bootstrap interval; * marks an interval "
             "that excludes 0; ~ one whose sign is not the same on every base (a base per seed). Task gain is "
             "Δ MedMCQA; forgetting is a fall of TriviaQA accuracy or a rise of WikiText perplexity.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in found["rows"]:
        beyond = [("task gain" if t == "medmcqa" else f"forgetting ({TASK_LABELS[t]})") for t in tasks if row[t]["beyond"]]
        lines.append("| " + " | ".join([row["variant"], row["corrects"], *(_ablation_cell(row[t]) for t in tasks),
                                        ", ".join(beyond) or "none"]) + " |")
    return [*lines, ""]


SHARED_BASE_NOTE = ("Δ is the mean over seeds of (variant - base) on the same examples; the interval is a "
                    "paired bootstrap over examples (WikiText: windows);")
PER_SEED_BASES_NOTE = ("Every seed finetunes its own base model (pretrained with that seed); the base row is their "
                       "mean. Δ is the mean over seeds of (variant - its seed's base) on the same examples; the "
                       "interval resamples the bases (with their runs) and the examples (WikiText: windows), "
                       "paired; ~ marks a change whose sign is not the same on every base;")


CONTROLS_NOTE = [
    "Controls: `smf-dense-accessed` updates every row the batch read and `smf-dense-all` every row "
    "of the table, with the same memory, optimizer and steps as the sparse variants: if they "
    "forget more at a similar task gain, the sparsity (not the added memory) keeps the probes. With "
    "SGD a row nobody read has no gradient, so the two controls are the same run; with AdamW they "
    "differ (`smf-tfidf-adamw` against `smf-dense-all-adamw`).", ""]


def _not_compared_note(results: dict) -> list[str]:
    skipped = results.get("not_compared")
    if not skipped:
        return []
    listed = ", ".join(f"{v} (seeds {', '.join(map(str, s))})" for v, s in skipped["variants"].items())
    return [f"Not in the frontiers, matched or ablation tables: {listed}. Each seed has its own base model, so "
            f"variants are compared on the same seeds, here {', '.join(map(str, skipped['seeds']))}.", ""]


def _missing_note(missing: dict) -> list[str]:
    parts = []
    if missing.get("unevaluated_runs"):
        parts.append("runs not evaluated (not run yet, cut short, or still running): "
                     + ", ".join(missing["unevaluated_runs"]))
    if missing.get("variants_without_runs"):
        parts.append("variants with no evaluated run: " + ", ".join(missing["variants_without_runs"]))
    if not parts:
        return []
    return ["Not in this report: " + "; ".join(parts) + ". `smf-ds experiment` with this --out (and its "
            "--methods/--seeds) runs what is missing.", ""]


def write_report(results: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    plot = plot_tradeoff(results, out_dir / "tradeoff.png")
    settings = results.get("settings", {})
    text = [
        "# SMF experiment report", "",
        "Variants (seeds): " + ", ".join(f"{name} ({', '.join(map(str, row['seeds']))})"
                                         for name, row in results["variants"].items())
        + f"; {settings.get('steps', '?')} finetuning steps each; data: {settings.get('data', '?')}.", "",
        results_table(results), "",
        f"MedMCQA accuracy is under the `{results['medmcqa_mode']}` mode; TriviaQA accuracy is alias-contains. "
        + (PER_SEED_BASES_NOTE if results.get("bases") == "per seed" else SHARED_BASE_NOTE)
        + f" {results['n_boot']} resamples; * marks an interval that excludes 0. Lower perplexity is better; a "
        "rise is forgetting.", "",
        *(MEMORISED_NOTE if "wikitext_memorised" in results["base"] else []),
        *(CONTROLS_NOTE if any(name.startswith("smf-dense") for name in results["variants"]) else []),
        *_missing_note(results.get("not_in_report", {})),
        *_not_compared_note(results),
        f"![task gain against forgetting]({plot.name})", "",
        *matched_tables(results),
        *ablation_table(results),
        "Per-example predictions of every run: `runs/<variant>/seed<k>/eval/`; the base model's: `base_eval/`"
        + (" (seed k's base: `base_eval/seed<k>/`)." if results.get("bases") == "per seed" else "."),
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
