"""Smoke tests for the benchmark runner and `python -m decodekit` (tiny shapes; timings not checked)."""

import json
import subprocess
import sys

import pytest
import torch

import decodekit as dk
from decodekit.bench import runner, sampling


def test_llm_logits_are_peaked_not_flat():
    x = sampling.llm_logits(64, 32000, seed=1)
    top = torch.softmax(x / sampling.TEMP, -1).max(-1).values
    assert x.shape == (64, 32000) and x.dtype == torch.float32
    assert 0.3 < float(top.median()) < 0.95 and float(top.min()) > 0.05
    flat = torch.softmax(sampling.flat_logits(4, 32000) / sampling.TEMP, -1).max(-1).values
    assert float(flat.max()) < 0.02


def test_sampling_run_tiny(tmp_path, capsys):
    path = tmp_path / "s.json"
    res = sampling.run(quick=True, json_path=str(path), threads=1, plot=False, shapes=[(2, 1000)])
    out = capsys.readouterr().out
    assert "targets" in out and "decodekit" in out
    data = json.loads(path.read_text())
    ops = {(r["group"], r["op"]) for r in data["rows"]}
    assert ("llm", "all4") in ops and ("flat", "top_p_probs") in ops
    for r in data["rows"]:
        assert r["us"]["decodekit"] > 0 and r["floor_cold_us"] > 0
        assert set(r["ratio"]) == set(r["us"]) - {"decodekit"}
    assert res["threads"] == 1


def test_llama_chain_matches_reference_survivors():
    L = sampling._llama()
    if L is None:
        pytest.skip("llama-cpp-python not installed")
    from decodekit import reference as ref

    x = sampling.llm_logits(8, 5000, seed=3)
    ch = sampling.LlamaChain(
        L, 8, 5000, [("temp", 0.7), ("top_k", 50), ("top_p", 0.9, 1), ("min_p", 0.05, 1), ("dist",)]
    )
    keep = ref.survivors(x, temperature=0.7, top_k=50, top_p=0.9, min_p=0.05)
    try:
        for _ in range(5):
            ch.fill(x.numpy())
            toks = ch.apply()
            assert all(bool(keep[b, t]) for b, t in enumerate(toks))
            assert [a.size for a in ch.arrs] == keep.sum(-1).tolist()
    finally:
        ch.free()


def test_runner_only_and_missing_modules(capsys):
    with pytest.raises(SystemExit):
        runner.parse_only("sampling,nope")
    assert runner.parse_only("sampling") == ["sampling"]
    assert "sampling" in runner.available()


def test_python_m_decodekit_demo():
    r = subprocess.run([sys.executable, "-m", "decodekit", "demo"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "same tokens on every ISA path" in r.stdout and "valid=False: True" in r.stdout
    assert "equal the reference (reference.survivors): True" in r.stdout
    assert dk.cpu_features()["active_isa"] in r.stdout


def test_sampling_cuda_benchmark_script_runs_on_cpu():
    """benchmarks/sampling_cuda.py (the GPU benchmark against FlashInfer, never run: no GPU here)
    keeps working: its dry run on the CPU times every op against the torch chain."""
    r = subprocess.run(
        [sys.executable, "benchmarks/sampling_cuda.py", "--device", "cpu", "--B", "2", "--V", "5000", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
    )
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.count("|") == 10 and not ln.startswith("op |")]
    assert len(rows) == 8 + 2, r.stdout  # the sampling ops, then the two speculative chains
    for ln in rows:  # decodekit and the torch chain both timed
        f = [c.strip() for c in ln.split("|")]
        assert f[3] != "n/a" and f[6] != "n/a", ln
    steps = [ln for ln in r.stdout.splitlines() if ln.startswith("step: ")]
    assert len(steps) == 4, r.stdout  # the whole step: top-k + top-p, top-p alone, min-p alone, typical
    for ln in steps:
        f = [c.strip() for c in ln.split("|")]
        assert len(f) == 9 and f[3] != "n/a" and f[5] != "n/a", ln
