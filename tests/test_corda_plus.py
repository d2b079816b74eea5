"""CorDA++: compactness metric, covariance selection, rank allocation, and the handoff with per-layer ranks."""

import functools
import json
from dataclasses import dataclass

import pytest
import torch

from corda_surgery.calib.data import CalibrationSpec
from corda_surgery.calib.store import CovarianceStore
from corda_surgery.decomposition.corda_plus import (
    BudgetError,
    allocate_ranks,
    context_spectrum,
    energy_compactness,
    plan_ranks,
    select_candidate,
)
from corda_surgery.decomposition.kinds import Mode, Solver
from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import SurgeryOptions
from corda_surgery.surgery.run import decompose_checkpoint


def test_metric_hand_computed():
    spectrum = torch.tensor([3.0, 2.0, 1.0, 1.0])  # σ² = 9, 4, 1, 1; total 15
    assert energy_compactness(spectrum, 2, Mode.IPM) == pytest.approx(13 / 15)
    assert energy_compactness(spectrum, 1, Mode.KPM) == pytest.approx(1 - 1 / 15)
    assert energy_compactness(spectrum, 3, Mode.KPM) == pytest.approx(1 - 6 / 15)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("factor", [1e-6, 0.37, 1e5])
def test_metric_invariant_to_covariance_scale(mode, factor):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=g, dtype=torch.float64)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    covariance = x.T @ x / 200
    base = energy_compactness(context_spectrum(weight, covariance, damping=0.01, solver=Solver.SVD), 4, mode)
    scaled = context_spectrum(weight, factor * covariance, damping=0.01, solver=Solver.SVD)
    assert energy_compactness(scaled, 4, mode) == pytest.approx(base, rel=1e-10)


def test_selection_picks_the_covariance_aligned_with_w():
    g = torch.Generator().manual_seed(1)
    u, _, vh = torch.linalg.svd(torch.randn(32, 32, generator=g, dtype=torch.float64))
    weight = u @ torch.diag(torch.linspace(3, 1, 32, dtype=torch.float64)) @ vh
    top = vh[:4]  # W's dominant input directions
    aligned = top.T @ torch.diag(torch.tensor([50.0, 40, 30, 20], dtype=torch.float64)) @ top + torch.eye(32) * 0.1
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    generic = q @ torch.diag(torch.linspace(1, 2, 32, dtype=torch.float64)) @ q.T
    spectra = [context_spectrum(weight, c, damping=0.01, solver=Solver.SVD) for c in (generic, aligned)]
    assert select_candidate(spectra, 4, Mode.IPM) == 1
    assert select_candidate([spectra[0], spectra[0].clone()], 4, Mode.IPM) == 0  # tie → first


def _spectra():
    flat = torch.ones(64)
    concentrated = torch.sqrt(0.8 ** torch.arange(64, dtype=torch.float64))  # σ² decays geometrically
    return {"flat": flat, "concentrated": concentrated}


@pytest.mark.parametrize("mode", list(Mode))
def test_concentrated_layer_gets_at_least_the_flat_layers_rank(mode):
    dims = {"flat": (64, 64), "concentrated": (64, 64)}
    ranks = allocate_ranks(_spectra(), dims, mode, param_budget=128 * 16, min_rank=2)
    assert ranks["concentrated"] >= ranks["flat"]
    assert ranks["concentrated"] > 8  # the budget really went where the metric says


@pytest.mark.parametrize("mode", list(Mode))
def test_budget_limits_and_reproducibility(mode):
    g = torch.Generator().manual_seed(3)
    spectra = {
        f"l{i}": torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values
        for i, n in enumerate([16, 32, 24, 48, 40])
    }
    dims = {f"l{i}": (n, n + 8) for i, n in enumerate([16, 32, 24, 48, 40])}
    budget = 3000
    ranks = allocate_ranks(spectra, dims, mode, param_budget=budget, min_rank=2, max_rank=20)
    used = sum(sum(dims[n]) * r for n, r in ranks.items())
    assert used <= budget
    growable = [sum(dims[n]) for n, r in ranks.items() if r < min(20, min(dims[n]))]
    assert not growable or budget - used < max(growable)  # within one rank unit of one layer
    assert all(2 <= r <= 20 for r in ranks.values())
    assert ranks == allocate_ranks(spectra, dims, mode, param_budget=budget, min_rank=2, max_rank=20)


def test_budget_below_minimum_is_an_error():
    with pytest.raises(BudgetError, match="below the minimum"):
        allocate_ranks(_spectra(), {"flat": (64, 64), "concentrated": (64, 64)}, Mode.IPM, param_budget=100, min_rank=4)


@dataclass(frozen=True)
class _Linear:
    name: str
    out_dim: int
    in_dim: int
    transposed: bool = False


def _hand_compactness(weight: torch.Tensor, covariance: torch.Tensor, rank: int, mode: Mode) -> float:
    damped = covariance + 0.01 * covariance.diagonal().mean() * torch.eye(covariance.shape[0], dtype=torch.float64)
    share = torch.linalg.svdvals(weight @ damped).square() / (weight @ damped).square().sum()
    return float(share[:rank].sum()) if mode is Mode.IPM else float(1 - share[-rank:].sum())


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("budget", [{}, {"rank_budget": 3.0}, {"param_budget": 150}])
def test_plan_ranks_selects_by_compactness_then_allocates(mode, budget):
    g = torch.Generator().manual_seed(4)
    linears = [_Linear("a", 24, 16), _Linear("b", 12, 16, transposed=True)]  # b is stored (in, out)
    stored = {"a": torch.randn(24, 16, generator=g, dtype=torch.float64), "b": torch.randn(16, 12, generator=g)}
    inputs = [torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.logspace(0, k, 16) for k in (0, 1, 2)]
    covariances = [x.T @ x / 200 for x in inputs]
    events: list[tuple] = []

    def read(index: int, name: str) -> torch.Tensor:
        events.append(("read", index, name))
        return covariances[index].clone()  # a fresh tensor: the decomposition overwrites what it reads

    def run(work, name):
        events.append(("run", name))
        return work(device=torch.device("cpu"))

    candidates = [functools.partial(read, i) for i in range(3)]
    plan = plan_ranks(
        linears,
        lambda linear: stored[linear.name],
        candidates,
        mode=mode,
        solver=Solver.GRAM,
        damping=0.01,
        base_rank=4,
        run=run,
        **budget,
    )

    # by hand: each candidate's compactness at the base rank, the best one's spectrum, then the budget's ranks
    assert events == [e for n in "ab" for i in range(3) for e in (("run", n), ("read", i, n))]  # read inside run
    for linear in linears:
        weight = stored[linear.name].T.double() if linear.transposed else stored[linear.name]
        hand = [_hand_compactness(weight, c, 4, mode) for c in covariances]
        record = plan.records[linear.name]
        assert list(record) == ["candidate_compactness", "compactness"]
        assert record["candidate_compactness"] == pytest.approx(hand, rel=1e-9)
        assert plan.candidate[linear.name] == max(range(3), key=hand.__getitem__)
        chosen = covariances[plan.candidate[linear.name]]
        spectrum = context_spectrum(
            stored[linear.name], chosen, damping=0.01, transposed=linear.transposed, solver=Solver.GRAM
        )
        assert torch.equal(plan.spectra[linear.name], spectrum)
        assert record["compactness"] == energy_compactness(spectrum, plan.ranks[linear.name], mode)
    dims = {"a": (24, 16), "b": (12, 16)}
    param_budget = budget.get("param_budget", round(budget.get("rank_budget", 0) * (40 + 28)))
    expected = allocate_ranks(plan.spectra, dims, mode, param_budget=param_budget) if budget else {"a": 4, "b": 4}
    assert plan.ranks == expected
    assert 0 not in plan.candidate.values()  # chosen by compactness, not by the tie rule's first


def test_rounds_are_stored_and_sum_to_the_total(tiny_llama, tmp_path):
    out = calibrate(
        tiny_llama,
        CalibrationSpec("gsm8k", samples=16, seq_len=48, batch_size=4, rounds=2),
        tmp_path / "r.h5",
        progress=False,
    )
    with CovarianceStore(out) as store:
        assert store.rounds == 2
        entry = store.by_linear["model.layers.0.mlp.up_proj"]
        total = store.covariance("model.layers.0.mlp.up_proj") * entry.count
        parts = sum(
            store.covariance("model.layers.0.mlp.up_proj", round_index=i) * entry.round_counts[i] for i in range(2)
        )
        assert torch.allclose(total, parts, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", list(Mode))
def test_corda_plus_handoff_with_per_layer_ranks(tiny_llama, tmp_path, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    qa = calibrate(
        tiny_llama,
        CalibrationSpec("nq_open", samples=16, seq_len=48, batch_size=4, rounds=2),
        tmp_path / "qa.h5",
        progress=False,
    )
    math = calibrate(
        tiny_llama, CalibrationSpec("gsm8k", samples=16, seq_len=48, batch_size=4), tmp_path / "math.h5", progress=False
    )
    out = decompose_checkpoint(
        tiny_llama,
        tmp_path / "out",
        SurgeryOptions(method="corda++", mode=mode, rank=8, rank_budget=8, min_rank=2, max_rank=24),
        stores=[qa, math],
        progress=False,
    )
    report = json.loads((out / "surgery.json").read_text())
    ranks = {name: layer["rank"] for name, layer in report["layers"].items()}
    assert len(set(ranks.values())) > 1
    assert all(len(layer["candidate_compactness"]) == 3 for layer in report["layers"].values())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and all(config["alpha_pattern"][k] == v for k, v in config["rank_pattern"].items())

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    batch = tokenizer(["who wrote hamlet?", "Tom has 3 apples and buys 5 more."], return_tensors="pt", padding=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    for name, rank in ranks.items():
        assert model.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == rank
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_llama)(**batch).logits
        got = model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert float((got - expected)[mask].abs().max()) <= 1e-4
