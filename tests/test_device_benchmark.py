"""``benchmarks/device.py``: the row list, and a ``--small`` CPU run of a subset of rows.

Compiling every row on the 2-core CPU takes ~50 s per length, so the run here times one
length and a few rows (the S5 layer against its anchor, a scan form, the Pallas scan where it
is accepted, an SSD form); the full row list is checked without running it, and the anchor
is checked to compute the same layer as ssmix's S5.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import device

SMALL = device.Shapes(B=2, H=64, S=8, heads=2, P=8, N=8, S4_H=4)


def test_rows_cover_every_layer_form_and_anchor():
    cases, notes = device.build_cases(SMALL, mamba_src=None)
    keys = [c.key for c in cases]
    assert len(keys) == len(set(keys))
    expected = [f"layer: {name}" for name in device.LAYERS]
    expected += [f"anchor: {device.S5_ANCHOR}", f"anchor: {device.S5_BIDIR_ANCHOR}"]
    expected += [f"linear_scan: {f}" for f in device.SCAN_FORMS if f != "pallas"]
    for group in ("ssd", "quasiseparable"):
        expected += [f"{group}: {f}" for f in device.SSD_FORMS if f != "pallas"]
    expected += [f"S4 power kernel: {f}" for f in device.POWER_FORMS]
    assert set(expected) <= set(keys)
    # A pallas row exactly when the kernel module accepts the method; else a note says why.
    # (Probed with a tiny abstract call: before the kernels land the method is refused.)
    for group in ("linear_scan", "ssd", "quasiseparable"):
        assert (f"{group}: pallas" in keys) == (f"{group}: pallas" not in notes)
    by_key = {c.key: c for c in cases}
    assert by_key["layer: S5"].anchor == device.S5_ANCHOR
    assert by_key["layer: S5 bidirectional"].anchor == device.S5_BIDIR_ANCHOR
    assert by_key["ssd: sequential"].max_length == device.SSD_SEQUENTIAL_MAX


def test_mamba_missing_source_is_a_note_not_a_crash(tmp_path):
    cases, notes = device.build_cases(SMALL, mamba_src=str(tmp_path))
    assert not any(c.group.startswith("mamba") for c in cases)
    assert set(notes) >= {f"mamba: {device.MAMBA_TRITON}", f"mamba: {device.MAMBA_MINIMAL}"}


def test_small_run_prints_table_and_writes_finite_json(tmp_path, capsys):
    only = [
        "layer: S5",
        f"anchor: {device.S5_ANCHOR}",
        "linear_scan: chunked",
        "linear_scan: pallas",
        "ssd: parallel",
    ]
    path = tmp_path / "device.json"
    # Under the GPU rules, so the layer rows are the forms a GPU runs (traced on the CPU).
    argv = ["--small", "--lengths", "17", "--repeats", "1", "--rules", "gpu"]
    argv += ["--json", str(path), "--only", *only]
    device.main(argv)
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["lengths"] == [17] and data["rules"] == "gpu"
    assert data["shapes"]["B"] == 2 and data["shapes"]["H"] == 64
    names = {(r["group"], r["name"]) for r in data["records"]}
    expected = {
        ("layer", "S5"),
        ("anchor", device.S5_ANCHOR),
        ("linear_scan", "chunked"),
        ("ssd", "parallel"),
    }
    if "linear_scan: pallas" in _keys():
        expected.add(("linear_scan", "pallas"))
    assert expected <= names
    for rec in data["records"]:
        assert "skipped" not in rec, rec
        assert math.isfinite(rec["seconds"]) and rec["seconds"] > 0
        assert rec["repeats"] == 1
    s5 = next(r for r in data["records"] if (r["group"], r["name"]) == ("layer", "S5"))
    assert s5["ratio_to_anchor"] == pytest.approx(s5["seconds"] / _seconds(data, device.S5_ANCHOR))
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[3].strip() == "L=17 ms"
    rows = {tuple(c.strip() for c in line.split("|")[1:3]) for line in table[1:]}
    assert expected <= rows
    assert "jax" in out and "B=2" in out and "H=64" in out and "auto rules: gpu" in out


def _seconds(data, name):
    return next(r["seconds"] for r in data["records"] if r["name"] == name)


def _keys():
    return {c.key for c in device.build_cases(SMALL, mamba_src=None)[0]}


def test_s5_anchor_is_the_same_layer_as_ssmix_s5():
    """The lindermanlab-style anchor, fed the ssmix layer's parameters, computes that layer
    (float32; bidirectional, so both scan directions; gradients w.r.t. the parameters and
    the input; L = 13)."""
    bidirectional = True
    from flax import nnx

    from ssmix import layers
    from ssmix.testing import check_equivalent

    layer = layers.S5(8, d_state=8, bidirectional=bidirectional, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = np.random.default_rng(0).standard_normal((2, 13, 8), dtype=np.float32)

    def ssmix_s5(state, x):
        return nnx.merge(graphdef, state)(x)

    def anchor(state, x):
        params = device.s5_anchor_params(nnx.merge(graphdef, state))
        return device.s5_anchor_apply(params, x, bidirectional)

    impls = {"ssmix S5": jax.jit(ssmix_s5), "anchor": jax.jit(anchor)}
    check_equivalent(impls, state, jnp.asarray(x))


def test_guards_skip_with_reasons(tmp_path, capsys):
    """A row projected over ``--row-seconds`` is skipped at the next length, rows over
    ``--max-seconds`` are not run, and the table names the reasons."""
    path = tmp_path / "guards.json"
    argv = ["--small", "--lengths", "8", "16", "--row-seconds", "1e-9", "--json", str(path)]
    device.main([*argv, "--only", "linear_scan: sequential"])
    out = capsys.readouterr().out
    first, second = json.loads(path.read_text())["records"]
    assert first["L"] == 8 and first["repeats"] == 1 and math.isfinite(first["seconds"])
    assert second["L"] == 16 and second["skipped"].startswith("projected")
    assert "skip [1]" in out and "[1] projected" in out

    device.main([*argv, "--max-seconds", "0", "--only", "ssd"])
    records = json.loads(path.read_text())["records"]
    assert records and all(r["skipped"].startswith("time budget") for r in records)
    assert {r["name"] for r in records} >= {"chunked", "parallel", "sequential"}
