"""The demo's outputs: the results table (Markdown, JSON) and the figures (PNG)."""

from __future__ import annotations

import json
import pathlib

import torch

from .experiments import Result

# The bar for the proximal methods on DIGITS: accuracy within 1 point of the unregularized MLP
# with at least half of the hidden units and a third of the input pixels removed.
BAR_ACCURACY_POINTS = 1.0
BAR_HIDDEN_REMOVED = 1 / 2
BAR_INPUTS_REMOVED = 1 / 3


def meets_bar(result: Result, baseline: Result) -> bool:
    inputs, *hidden = result.units
    hidden_kept = sum(k for k, _ in hidden)
    hidden_total = sum(t for _, t in hidden)
    return (100 * (baseline.metric - result.metric) <= BAR_ACCURACY_POINTS
            and hidden_total - hidden_kept >= BAR_HIDDEN_REMOVED * hidden_total
            and inputs[1] - inputs[0] >= BAR_INPUTS_REMOVED * inputs[1])


def _units(result: Result) -> str:
    return "-".join(str(k) for k, _ in result.units)


def _units_total(result: Result) -> str:
    return "-".join(str(t) for _, t in result.units)


def _optimizer(result: Result) -> str:
    m = result.method
    name = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[m.optimizer]
    return f"{name} {m.lr:g}"


def _baseline(rows: list[Result], r: Result) -> Result | None:
    """The unregularized run with the same optimizer and lr (else the "none" run)."""
    same = [b for b in rows if b.method.update == "none" and b.method.optimizer ==
            r.method.optimizer and b.method.lr == r.method.lr]
    return same[0] if same else next((b for b in rows if b.method.name == "none"), None)


def _label(r: Result) -> str:
    reached = r.target_reached
    if r.method.scratch_of is not None:
        inits = " / ".join(f"{100 * m:.1f}" for m in r.inits)
        return (f"{r.method.label} ({'-'.join(str(k) for k, _ in r.units)}; "
                f"{len(r.inits)} inits: {inits} %, the median's row)")
    if reached is None:
        return r.method.label
    return r.method.label + ": reached " + ", ".join(f"{pool} {100 * v:.1f} %"
                                                      for pool, v in reached.items())


COUPLED_TITLES = {
    "resnet": "DIGITS 8x8 images, ResNet (BasicBlocks 8-16, BatchNorm, downsample shortcut)",
    "transformer": "DIGITS, transformer (each image row a token; 2 layers, d 32, 4 heads, MLP 64)",
}


def _coupled_table(task: str, rows: list[Result]) -> str:
    kinds = rows[0].kinds
    totals = ", ".join(f"{k} (of {t})" for k, (_, t) in zip(kinds, rows[0].units))
    head = (f"| method | optimizer | λ | epochs | test acc. | as trained | kept: {totals} | "
            "compact params | FLOPs compact / dense | CPU latency compact / dense | "
            "compact = model |")
    lines = [f"**{COUPLED_TITLES[task]}**", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lam = "—" if r.method.update == "none" else f"{r.method.lam:.3g}"
        kept = ", ".join(str(a) for a, _ in r.units)
        check = ("yes" if r.same_predictions else "**NO**") + f" ({r.max_diff:.0e})"
        flops = f"{r.flops[0] / 1e6:.2f} M / {r.flops[1] / 1e6:.2f} M"
        latency = f"{r.latency_ms[0]:.2f} / {r.latency_ms[1]:.2f} ms"
        lines.append(f"| {r.method.label} | {_optimizer(r)} | {lam} | {r.epochs} | "
                     f"{100 * r.metric:.1f} % | {100 * r.metric_dense:.1f} % | {kept} | "
                     f"{r.params[0]} / {r.params[1]} | {flops} | {latency} | {check} |")
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    """One Markdown table per task."""
    blocks = []
    for task, title in (("digits", "DIGITS, MLP 64-40-20-10"),
                        ("diabetes", "diabetes regression, MLP 10-20-15-1"),
                        ("cnn", "DIGITS 8x8 images, CNN (channels 1-16-32-64)")):
        rows = [r for r in results if r.method.task == task]
        if not rows:
            continue
        metric = "R² (MSE)" if task == "diabetes" else "test acc."
        head = (f"| method | optimizer | λ | epochs | {metric} | as trained | units alive "
                f"({_units_total(rows[0])}) | weights kept | compact params | zeros | "
                f"compact = model |")
        lines = [f"**{title}**", "", head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if task == "diabetes":
                score = f"{r.metric:.3f} ({r.mse:.0f})"
                trained = f"{r.metric_dense:.3f}"
            else:
                score, trained = f"{100 * r.metric:.1f} %", f"{100 * r.metric_dense:.1f} %"
                baseline = _baseline(rows, r)
                if task == "digits" and baseline is not None and r.method.update == "prox":
                    score += " ✓" if meets_bar(r, baseline) else ""
            lam = "—" if r.method.update == "none" else f"{r.method.lam:.3g}"
            kept, total = r.weights_kept
            check = ("yes" if r.same_predictions else "**NO**") + f" ({r.max_diff:.0e})"
            lines.append(
                f"| {_label(r)} | {_optimizer(r)} | {lam} | {r.epochs} | {score} | "
                f"{trained} | {_units(r)} | {100 * kept / total:.1f} % | "
                f"{r.params[0]} / {r.params[1]} | {r.zeros} | {check} |")
        blocks.append("\n".join(lines))
    for task in COUPLED_TITLES:
        rows = [r for r in results if r.method.task == task]
        if rows:
            blocks.append(_coupled_table(task, rows))
    return "\n\n".join(blocks) + "\n"


def as_json(results: list[Result]) -> list[dict]:
    return [dict(method=r.method.name, task=r.method.task, label=r.method.label,
                 update=r.method.update, preset=r.method.preset, lam=r.method.lam,
                 optimizer=r.method.optimizer, lr=r.method.lr, epochs=r.epochs,
                 seconds=round(r.seconds, 3), metric=r.metric, metric_as_trained=r.metric_dense,
                 mse=r.mse, units=r.units, weights_kept=r.weights_kept, params=r.params,
                 zeros=r.zeros, max_diff=r.max_diff, same_predictions=r.same_predictions,
                 kept_inputs=None if r.kept_inputs is None else r.kept_inputs.tolist(),
                 kinds=list(r.kinds), flops=r.flops, latency_ms=r.latency_ms,
                 target=r.method.target, target_reached=r.target_reached,
                 inits=list(r.inits))
            for r in results]


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the demo's figures need matplotlib (pip install matplotlib); "
                          "--no-plots skips them") from exc
    return plt


def _pixel_mask(result: Result) -> torch.Tensor:
    mask = torch.zeros(64)
    mask[result.kept_inputs] = 1.0
    return mask.reshape(8, 8).numpy()


def plot_run(result: Result, path: pathlib.Path) -> pathlib.Path:
    """Units alive per layer over the epochs; for DIGITS, the kept input pixels beside it."""
    plt = _pyplot()
    pixels = result.method.task == "digits"
    fig, axes = plt.subplots(1, 2 if pixels else 1, figsize=(8.5 if pixels else 6, 3.4),
                             gridspec_kw={"width_ratios": [2.3, 1]} if pixels else None)
    ax = axes[0] if pixels else axes
    h = result.history
    names = list(h.units)
    for k, name in enumerate(names):
        label = "inputs" if k == 0 else f"hidden {k}" if result.method.task != "cnn" \
            else f"channels {k}"
        if result.kinds:  # coupled tasks: one curve per kind of unit
            label = name
        total = result.units[k][1]
        ax.plot(h.steps, h.units[name], label=f"{label} (of {total})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("units alive")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    ax.set_title(f"{result.method.task}: {result.method.label}", fontsize="medium")
    if pixels:
        axes[1].imshow(_pixel_mask(result), cmap="gray_r", vmin=-0.2, vmax=1)
        axes[1].set_title(f"input pixels kept: {result.units[0][0]}/64", fontsize="medium")
        axes[1].set_xticks([])
        axes[1].set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_pixels(results: list[Result], path: pathlib.Path) -> pathlib.Path | None:
    """The kept input pixels of every DIGITS run, side by side (the README's figure)."""
    rows = [r for r in results if r.method.task == "digits"]
    if not rows:
        return None
    plt = _pyplot()
    cols = min(len(rows), 7)
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, r in zip(axes.flat, rows):
        ax.imshow(_pixel_mask(r), cmap="gray_r", vmin=-0.2, vmax=1)  # removed: light gray
        ax.set_title(f"{r.method.label}\n{_units(r)}, {100 * r.metric:.1f} %", fontsize=7)
    fig.suptitle("DIGITS: input pixels kept (black), units alive 64-40-20, test accuracy",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(results: list[Result], out: pathlib.Path, header: str, plots: bool = True) -> dict:
    """Writes results.md, results.json and the figures into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"table": out / "results.md", "json": out / "results.json"}
    written["table"].write_text(header + "\n\n" + table(results))
    written["json"].write_text(json.dumps(as_json(results), indent=1))
    if plots:
        for r in results:
            written[r.method.name] = plot_run(r, out / f"{r.method.name}.png")
        pixels = plot_pixels(results, out / "digits-pixels.png")
        if pixels is not None:
            written["pixels"] = pixels
    return written
