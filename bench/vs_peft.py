"""Benchmark: PEFT's preprocess_corda against `corda-surgery convert` on the same tokens, mode and rank.

Each side runs in its own process under /usr/bin/time -v (wall, CPU, peak RSS). Both adapters are then
compared layer by layer (relative error of s·B·A and of the residual weight). Ours runs with
--covariance-norm peft, PEFT's per-sample rule, so both see the same covariances (all samples have the
same length, so batching 8 samples changes nothing but speed; PEFT's hook only takes batch size 1).

    python bench/vs_peft.py --quick                         # small random Llama, < 2 minutes
    python bench/vs_peft.py --hidden 2048 --layers 8        # the 536 M model of the issue
    python bench/vs_peft.py --hidden 2048 --layers 16 --skip-peft   # depth scaling of our memory
    python bench/vs_peft.py --hidden 2048 --layers 8 --reuse-peft   # after a change: PEFT's earlier run
    python bench/vs_peft.py --real      # embedded SmolLM2 on NQ-open records: subspaces against float64

``--real`` also prints, per layer type, the largest principal angle between PEFT's and our adapter
subspaces (row space of A, column space of B) and each one's to the float64 decomposition of the same
damped product (full SVD, from our store's covariance).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from corda_surgery.export.peft_adapter import read_adapter  # noqa: E402


def build_model(folder: Path, hidden: int, layers: int, intermediate: int, heads: int, vocab: int) -> None:
    """A random-initialised Llama saved in float32, with a tokenizer (the embedded model's) beside it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from corda_surgery.models import embedded_model_dir

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(folder)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters in {folder}", flush=True)


def timed(command: list[str], log: Path) -> dict:
    """Run under /usr/bin/time -v; wall and CPU seconds and peak RSS in MB."""
    with log.open("w") as handle:
        result = subprocess.run(["/usr/bin/time", "-v", *command], stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed, see {log}")
    return timed_from_log(log)


def timed_from_log(log: Path) -> dict:
    text = log.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", text)[1])
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", text)[1])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1])
    return {"wall_s": hours * 3600 + minutes * 60 + seconds, "cpu_s": user + system, "peak_rss_mb": rss / 1024}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def compare(peft_dir: Path, ours_dir: Path) -> dict:
    """Per-layer relative errors of s·B·A and of the residual weight, worst and median."""
    theirs, ours = read_adapter(peft_dir / "adapter"), read_adapter(ours_dir / "adapter")
    their_base, our_base = _tensors(peft_dir / "base"), _tensors(ours_dir)
    delta_errors, residual_errors = {}, []
    for module in ours.lora_A:
        reference = theirs.delta(module)
        delta_errors[module] = float((ours.delta(module) - reference).norm() / reference.norm())
        key = f"{module}.weight"
        residual_errors.append(float((our_base[key] - their_base[key]).norm() / their_base[key].norm()))
    return {
        "layers": len(delta_errors),
        "delta_worst": max(delta_errors.values()),
        "delta_median": statistics.median(delta_errors.values()),
        "residual_worst": max(residual_errors),
        "residual_median": statistics.median(residual_errors),
        "per_layer_delta": delta_errors,
    }


def float64_arbiter(model_dir: Path, peft_dir: Path, ours_dir: Path, modules: list[str], mode: str) -> dict:
    """For layers where the two float32 answers disagree: each one's distance to the float64 decomposition
    (same covariance, from our store) and the relative gap between the singular values at the cut."""
    from corda_surgery.calib.store import CovarianceStore
    from corda_surgery.decomposition.decompose import decompose_weight

    theirs, ours = read_adapter(peft_dir / "adapter"), read_adapter(ours_dir / "adapter")
    keys = {f"{m}.weight" for m in modules}
    weights = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            weights.update({k: handle.get_tensor(k) for k in handle.keys() if k in keys})
    verdicts = {}
    with CovarianceStore(ours_dir / "covariances.h5") as store:
        for module in modules:
            rank = ours.lora_A[module].shape[0]
            exact = decompose_weight(
                weights[f"{module}.weight"],
                store.covariance(module),
                rank=rank,
                mode=mode,
                alpha=rank * ours.scaling(module),
                solver="svd",
                factor_dtype=torch.float64,
                name=module,
            )
            reference = exact.scaling * exact.lora_B @ exact.lora_A
            spectrum, cut = exact.spectrum, (rank - 1 if mode == "ipm" else len(exact.spectrum) - rank)
            neighbour = cut + 1 if mode == "ipm" else cut - 1
            verdicts[module] = {
                "ours_vs_float64": float((ours.delta(module).double() - reference).norm() / reference.norm()),
                "peft_vs_float64": float((theirs.delta(module).double() - reference).norm() / reference.norm()),
                "cut_relative_gap": float(abs(spectrum[cut] - spectrum[neighbour]) / spectrum[cut]),
            }
    return verdicts


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flop_floor(model_dir: Path, tokens: int, window: int, float64_cost: float) -> dict:
    """FLOPs of the work itself, in float32-equivalents: block forward (2·params·tokens, and attention's two
    products over the causal half of each window, 2·hidden·window·tokens), one symmetric XᵀX per distinct
    input (in²·tokens), and per linear W·C (2·out·in²), the float64 symmetric Gram matrix of its tall side
    (m·n²: half a GEMM) and its symmetric eigen-decomposition with vectors (≥ 10/3·n³: tridiagonal
    reduction and back-transformation); ``float64_cost`` = float32 / float64 matmul rate."""
    config = json.loads((model_dir / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    block_params = 4 * h * h + 3 * h * i
    forward = (2 * block_params + 2 * h * window) * layers * tokens
    covariance = (3 * h * h + i * i) * layers * tokens
    shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]
    decomposition = layers * sum(
        2 * o * n * n + float64_cost * (max(o, n) * min(o, n) ** 2 + 10 / 3 * min(o, n) ** 3) for o, n in shapes
    )
    return {"forward": forward, "covariance": covariance, "decomposition": decomposition}


def earlier_peft_run(work: Path) -> dict:
    """Timing of the PEFT run kept in WORK (its log) — for --reuse-peft."""
    if not (work / "peft" / "adapter").is_dir() or not (work / "peft.log").is_file():
        raise SystemExit(f"--reuse-peft: no earlier PEFT run in {work}")
    return timed_from_log(work / "peft.log")


def real_tokens(model_dir: Path, samples: int, seq_len: int, path: Path) -> None:
    """The first ``samples`` NQ-open question+answer records (seed 0), tokenised once for both sides."""
    from transformers import AutoTokenizer

    from corda_surgery.calib.data import CalibrationSpec, token_batches

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = CalibrationSpec("nq_open", samples=samples, seq_len=seq_len, batch_size=1, chat_template=False)
    batches, description = token_batches(spec, tokenizer, len(tokenizer))
    with path.open("w") as handle:
        for batch in batches:
            handle.write(json.dumps({"input_ids": batch.input_ids[0].tolist()}) + "\n")
    print(f"{len(batches)} NQ-open records, {description['tokens']} tokens", flush=True)


def _largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle in degrees between the spaces spanned by the columns of ``a`` and ``b``."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cosine = float(torch.linalg.svdvals(qa.T @ qb).min().clamp(max=1.0))
    return float(torch.rad2deg(torch.arccos(torch.tensor(cosine))))


def subspace_table(model_dir: Path, peft_dir: Path, ours_dir: Path, mode: str) -> dict:
    """Per layer type: largest principal angles (median and max over layers) between PEFT's, ours and the
    float64 answer, for the row space of A and the column space of B."""
    from corda_surgery.calib.store import CovarianceStore
    from corda_surgery.checkpoint.view import ModelView
    from corda_surgery.decomposition.decompose import decompose_weight

    theirs, ours = read_adapter(peft_dir / "adapter"), read_adapter(ours_dir / "adapter")
    view = ModelView(model_dir)
    angles: dict[str, dict[str, list[float]]] = {}
    with CovarianceStore(ours_dir / "covariances.h5") as store:
        for module in sorted(ours.lora_A):
            rank = ours.rank_of(module)
            exact = decompose_weight(view.read(f"{module}.weight"), store.covariance(module), rank=rank, mode=mode,
                                     solver="svd", factor_dtype=torch.float64, name=module)  # fmt: skip
            pairs = {
                "ours vs PEFT": (ours, theirs),
                "ours vs float64": (ours, exact),
                "PEFT vs float64": (theirs, exact),
            }
            row = angles.setdefault(module.rpartition(".")[2], {})
            for label, (x, y) in pairs.items():
                xa, xb = (x.lora_A[module], x.lora_B[module]) if x is not exact else (x.lora_A, x.lora_B)
                ya, yb = (y.lora_A[module], y.lora_B[module]) if y is not exact else (y.lora_A, y.lora_B)
                row.setdefault(f"A {label}", []).append(_largest_angle(xa.T, ya.T))
                row.setdefault(f"B {label}", []).append(_largest_angle(xb, yb))
    return {kind: {k: (statistics.median(v), max(v)) for k, v in row.items()} for kind, row in angles.items()}


def print_subspace_table(table: dict) -> None:
    columns = list(next(iter(table.values())))
    print("\n| layer type | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for kind, row in table.items():
        print(f"| {kind} | " + " | ".join(f"{row[c][0]:.2g}° / {row[c][1]:.2g}°" for c in columns) + " |")
    print("(largest principal angle between the two subspaces, median / max over the 30 layers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="An existing Llama-family checkpoint instead of a random one.")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mode", choices=["kpm", "ipm"], default="kpm")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench_vs_peft")
    parser.add_argument("--skip-peft", action="store_true", help="Only run corda-surgery (depth scaling).")
    parser.add_argument(
        "--reuse-peft",
        action="store_true",
        help="Compare with the PEFT run already in the work folder (same model and tokens) "
        "instead of running it again; its log gives the timing.",
    )
    parser.add_argument("--quick", action="store_true", help="hidden 512, 4 layers, 8 × 128 tokens.")
    parser.add_argument(
        "--real",
        action="store_true",
        help="The embedded SmolLM2-135M on 64 NQ-open records (≤ 256 tokens), plus the subspace table.",
    )
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads, args.samples, args.seq_len = 512, 4, 1408, 8, 8, 128
    if args.real:
        from corda_surgery.models import embedded_model_dir

        args.model_dir, args.samples, args.seq_len = embedded_model_dir(), 64, 256
    tag = "smollm2_nq_open" if args.real else f"h{args.hidden}_l{args.layers}"
    work = args.work / tag
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or work / "model"
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, args.hidden, args.layers, args.intermediate, args.heads, args.vocab)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    token_file = work / "tokens.jsonl"
    if args.real:
        real_tokens(model_dir, args.samples, args.seq_len, token_file)
    else:
        with token_file.open("w") as handle:
            for _ in range(args.samples):
                ids = torch.randint(0, vocab, (args.seq_len,), generator=generator).tolist()
                handle.write(json.dumps({"input_ids": ids}) + "\n")

    results = {}
    if args.reuse_peft:
        results["PEFT preprocess_corda"] = earlier_peft_run(work)
    elif not args.skip_peft:
        shutil.rmtree(work / "peft", ignore_errors=True)
        results["PEFT preprocess_corda"] = timed(
            [
                sys.executable,
                str(REPO / "bench" / "_peft_corda.py"),
                str(model_dir),
                str(token_file),
                str(work / "peft"),
                args.mode,
                str(args.rank),
            ],
            work / "peft.log",
        )
    results["corda-surgery convert"] = timed(
        [
            str(Path(sys.executable).with_name("corda-surgery")),  # this environment's, not whatever PATH finds
            "convert",
            str(model_dir),
            "--data",
            str(token_file),
            "--samples",
            str(args.samples),
            "--seq-len",
            str(args.seq_len),
            "--batch-size",
            "8",
            "--covariance-norm",
            "peft",
            "--mode",
            args.mode,
            "--rank",
            str(args.rank),
            "--out",
            str(work / "ours"),
            "--keep-covariances",  # the float64 arbiter and the subspace table read its store
            "--overwrite",
        ],
        work / "ours.log",
    )

    size_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    rate, rate64 = matmul_gflops(), matmul_gflops(torch.float64)
    tokens = sum(len(json.loads(line)["input_ids"]) for line in token_file.read_text().splitlines())
    floor = flop_floor(model_dir, tokens, args.seq_len, rate / rate64)
    floor_s = sum(floor.values()) / (rate * 1e9)
    print(
        f"\nmodel {tag}: {size_mb:.0f} MB float32; {args.samples} samples, {tokens} tokens; "
        f"{args.mode} rank {args.rank}; "
        f"matmul {rate:.0f} GFLOP/s fp32, {rate64:.0f} fp64; FLOP floor {floor_s:.1f} s "
        f"(forward {floor['forward'] / 1e12:.2f}, covariance {floor['covariance'] / 1e12:.2f}, "
        f"decomposition {floor['decomposition'] / 1e12:.2f} TFLOP)"
    )
    print("| run | wall s | CPU s | peak RSS MB |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    if "PEFT preprocess_corda" in results:
        parity = compare(work / "peft", work / "ours")
        peft, ours = results["PEFT preprocess_corda"], results["corda-surgery convert"]
        print(
            f"\nspeed-up {peft['wall_s'] / ours['wall_s']:.1f}× wall, "
            f"memory {peft['peak_rss_mb'] / ours['peak_rss_mb']:.1f}× "
            f"lower; ours / FLOP floor {ours['wall_s'] / floor_s:.2f}"
        )
        print(
            f"parity over {parity['layers']} layers: s·B·A worst {parity['delta_worst']:.2e} median "
            f"{parity['delta_median']:.2e}; residual worst {parity['residual_worst']:.2e} median "
            f"{parity['residual_median']:.2e}"
        )
        disagreeing = [m for m, e in parity["per_layer_delta"].items() if e > 1e-3]
        if disagreeing:
            verdicts = float64_arbiter(model_dir, work / "peft", work / "ours", disagreeing, args.mode)
            print(f"{len(disagreeing)} layers differ by more than 1e-3; distance of each to the float64 answer:")
            for module, v in verdicts.items():
                print(
                    f"  {module}: ours {v['ours_vs_float64']:.1e}, PEFT {v['peft_vs_float64']:.1e} "
                    f"(gap at the cut {v['cut_relative_gap']:.1e} relative)"
                )
            parity["float64_arbiter"] = verdicts
        results["parity"] = parity
        if args.real:
            results["subspaces"] = subspace_table(model_dir, work / "peft", work / "ours", args.mode)
            print_subspace_table(results["subspaces"])
    results.update(
        {
            "model": tag,
            "size_mb": size_mb,
            "matmul_gflops": rate,
            "matmul_gflops_fp64": rate64,
            "flop_floor_s": floor_s,
            "flop_floor_tflop": {k: v / 1e12 for k, v in floor.items()},
        }
    )
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
