"""Regenerate the robustness study: ``python -m experiments.robustness [--tiny] [--out DIR]``.

Writes ``transfer.png``, ``transfer.json``, ``noise.json`` and ``summary.md`` to ``--out``
(default ``experiments/robustness/results``). ``--tiny`` runs every step at toy sizes in
seconds (for the test suite); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from experiments.robustness import noise, transfer

RESULTS = Path(__file__).resolve().parent / "results"

# Points kept per decade of the decimated curves in transfer.json (plus every spike).
_JSON_PER_DECADE = 120

_NAMES = {
    "s4d": "S4D-LegS (B clipped, as initialised)",
    "s4d_exact_b": "S4D-LegS (exact B = V*b)",
    "s4_ptd": "S4-PTD",
}


def _configs(tiny: bool):
    if tiny:
        task = noise.TaskConfig(length=24, code_length=4, n_train=64, n_test=32)
        train = noise.TrainConfig(d_model=4, d_state=16, n_layers=1, batch_size=8, steps=3)
        return {"N": 16, "n_grid": 200}, task, train
    return {"N": 64, "n_grid": 3000}, noise.TaskConfig(), noise.TrainConfig()


def _decimate(study: dict) -> dict:
    """A copy of ``study`` whose curves keep ~``_JSON_PER_DECADE`` points per decade."""
    omega = np.asarray(study["omega"])
    decades = np.log10(omega[-1] / omega[0])
    targets = np.geomspace(omega[0], omega[-1], max(2, int(decades * _JSON_PER_DECADE)))
    keep = set(np.searchsorted(omega, targets).clip(0, len(omega) - 1).tolist())
    marked = [s["omega"] for s in study["spikes"]] + [study["control"]["omega"]]
    keep |= {int(np.searchsorted(omega, w)) for w in marked}
    idx = np.asarray(sorted(keep))

    def cut(values):
        return [float(f"{v:.5g}") for v in np.asarray(values)[idx]]

    out = {k: v for k, v in study.items() if k not in ("omega", "gain", "error")}
    out["omega"] = cut(omega)
    out["gain"] = {k: cut(v) for k, v in study["gain"].items()}
    out["error"] = {k: cut(v) for k, v in study["error"].items()}
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def summary_markdown(study: dict, result: dict, seconds: float, tiny: bool) -> str:
    """The Markdown summary of both steps (tables only; the README links it)."""
    lines = ["# Robustness study: S4D vs S4-PTD under Fourier-mode noise", ""]
    if tiny:
        lines += ["**Tiny smoke run: toy sizes, the numbers mean nothing.**", ""]
    lines += [
        f"Regenerate with `python -m experiments.robustness` ({seconds:.0f} s for this run). "
        "Code: `experiments/robustness/` (`transfer.py` step 1, `noise.py` step 2).",
        "",
        f"## 1. Transfer functions, N = {study['N']}",
        "",
        f"Readout {study['readout']}; HiPPO-LegS full matrix vs S4D-LegS (normal part, ½·V*b) "
        f"vs PTD (Λ̃, Ṽ⁻¹b, cṼ); max |G_HiPPO(iω)| = {study['max_gain_hippo']:.3g}. "
        "Plot: [transfer.png](transfer.png); numbers: [transfer.json](transfer.json).",
        "",
        "| diagonal form | max error over ω | at ω | median error |",
        "|---|---|---|---|",
    ]
    for name, label in (("s4d", "S4D-LegS"), ("ptd", "PTD")):
        s = study["summary"][name]
        lines.append(
            f"| {label} | {s['max_error']:.3g} | {s['argmax_omega']:.4g} | "
            f"{s['median_error']:.3g} |"
        )
    lines += ["", "S4D's spikes (highest local maxima of |G_S4D − G_HiPPO|):", ""]
    lines += [
        "| spike | ω | S4D error | PTD error at ω | \\|G_HiPPO(iω)\\| |",
        "|---|---|---|---|---|",
    ]
    for i, s in enumerate(study["spikes"], 1):
        lines.append(
            f"| {i} | {s['omega']:.5g} | {s['error']:.3g} | {s['error_ptd']:.3g} | "
            f"{s['gain_hippo']:.3g} |"
        )
    ctl = study["control"]
    lines.append(
        f"| control | {ctl['omega']:.5g} | {ctl['error']:.3g} | {ctl['error_ptd']:.3g} | "
        f"{ctl['gain_hippo']:.3g} |"
    )
    lines += [
        "",
        "(control: the frequency between the lowest and highest spike where S4D's error is "
        "smallest.)",
    ]
    task, train = result["task"], result["train"]
    freqs = result["frequencies"]
    lines += [
        "",
        "## 2. Fourier-mode noise",
        "",
        f"Task: delayed pattern recall, L = {task['length']}, {task['n_classes']} classes "
        f"(random ±1 codes of length {task['code_length']} at the start, Gaussian noise "
        f"σ = {task['sigma']}), read out at the last position. Model: {train['n_layers']} "
        f"pre-norm GLU blocks, H = {train['d_model']}, N = {train['d_state']}, "
        f"{train['steps']} steps of batch {train['batch_size']}. Noise "
        "s·U[0,1)·cos(ω·Δ_h·ℓ) added to every SSM layer's input at S4D's spike frequencies "
        f"and at the control ω = {freqs['control']:.5g}. Accuracy (%) on "
        f"{task['n_test']} test sequences:",
        "",
    ]
    cols = [k for k in freqs if k != "control"] + ["control"]
    for amp in result["amplitudes"]:
        head = " | ".join(f"{k.replace('_', ' ')} (ω = {freqs[k]:.4g})" for k in cols)
        lines += [f"Noise scale s = {amp}:", "", f"| model | clean | {head} |"]
        lines.append("|---|---|" + "---|" * len(cols))
        for name, r in result["models"].items():
            accs = " | ".join(_pct(r["noisy"][str(amp)][k]) for k in cols)
            lines.append(f"| {_NAMES.get(name, name)} | {_pct(r['clean'])} | {accs} |")
        lines.append("")
    lines += [
        "Gain of the trained first SSM layer for a unit input cos(ω·Δ_h·ℓ) (output without "
        "D·u; median / max over features):",
        "",
        "| model | " + " | ".join(k.replace("_", " ") for k in cols) + " | train s | final loss |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    for name, r in result["models"].items():
        g = " | ".join(
            f"{r['first_layer_gain'][k][0]:.2g} / {r['first_layer_gain'][k][1]:.2g}" for k in cols
        )
        t = r["train"]
        lines.append(
            f"| {_NAMES.get(name, name)} | {g} | {t['seconds']:.0f} | {t['final_loss']:.3g} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run both steps and write the results (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes, seconds (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    study_cfg, task, train = _configs(args.tiny)
    study = transfer.transfer_study(**study_cfg)
    spikes = [s["omega"] for s in study["spikes"]]
    result = noise.run(spikes, study["control"]["omega"], task, train)
    seconds = time.perf_counter() - start
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    transfer.plot_transfer(study, out / "transfer.png")
    (out / "transfer.json").write_text(json.dumps(_decimate(study)) + "\n")
    result = {**result, "seconds": seconds, "tiny": args.tiny}
    (out / "noise.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(study, result, seconds, args.tiny))
    logging.info("wrote %s in %.0f s", out, seconds)


if __name__ == "__main__":
    main()
