"""Peak memory and wall time of `corda-surgery convert` on Llama-3-70B- and 8B-shaped layers, against the plan.

Builds a random Llama checkpoint in bfloat16 with the real layer shapes (70B: hidden 8192, intermediate
28672, 64 heads, 8 KV heads; 8B: 4096 / 14336 / 32 / 8) and SmolLM2's tokenizer and vocabulary, then runs
the ordinary `convert` command on 16 × 512 tokens of WikiText-2 (KPM, rank 16) while reading the process's
peak resident memory (the kernel's high-water mark, reset as each phase starts) every 0.1 s, and the bytes
under the output's folder (everything beside the checkpoint: the output, its hidden store and staging, the
finished work) every 0.5 s. Phases are told apart
by the progress bars the command prints: setup + capture (before the `blocks` bar), `blocks` (calibration;
in one pass each block is decomposed there too), `tensors` (the output's shards; in two passes the
decompositions happen there). The plan the command prints first is parsed and set against the measured peaks.

    python bench/big_layer.py --shape 8b --layers 1
    python bench/big_layer.py --shape 70b --layers 2 --targets down_proj [--keep-covariances | --two-passes]
    python bench/big_layer.py --readme      # the README's main command itself: the plan against its peaks
    python bench/big_layer.py --shape 70b --keep-output /tmp/free            # unbounded, its output kept
    python bench/big_layer.py --shape 70b --memory-budget 8GiB --against /tmp/free   # within 8 GiB, compared
    python bench/big_layer.py --shape 1b --layers 8 --residual int4        # a 4-bit residual: flat in depth?

Each run appends one JSON line to bench/results/big_layer.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

from corda_surgery.models import embedded_model_dir

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2_raw" / "wiki.test.raw"
RESULTS = REPO / "bench" / "results" / "big_layer.jsonl"
SHAPES = {
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},  # checks
}
# the progress bar that starts each phase, in order; in one pass `convert` decomposes each block as it is summed
ONE_PASS = (("blocks", "calibration + decomposition"), ("tensors", "writing"))
CALIBRATE, DECOMPOSE = (("blocks", "calibration"),), (("tensors", "decomposition + writing"),)
GIB = 1 << 30


def build_checkpoint(folder: Path, shape: str, layers: int) -> Path:
    """A random bfloat16 Llama with ``shape``'s layers, written one shard per layer (as hub checkpoints are)."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, vocab_size=len(tokenizer), rope_theta=500000.0,
                         max_position_embeddings=8192, tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    generator = torch.Generator().manual_seed(0)

    def random(*shape_: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape_, generator=generator) * std).to(torch.bfloat16)

    weight_map = {}
    stem = {"model.embed_tokens.weight": random(config.vocab_size, hidden), "model.norm.weight": torch.ones(
        hidden, dtype=torch.bfloat16), "lm_head.weight": random(config.vocab_size, hidden)}  # fmt: skip
    shards = [("stem", stem)]
    for i in range(layers):
        p = f"model.layers.{i}"
        shards.append((f"layer{i}", {
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{p}.self_attn.q_proj.weight": random(hidden, hidden), f"{p}.self_attn.k_proj.weight": random(kv, hidden),
            f"{p}.self_attn.v_proj.weight": random(kv, hidden), f"{p}.self_attn.o_proj.weight": random(hidden, hidden),
            f"{p}.mlp.gate_proj.weight": random(inter, hidden), f"{p}.mlp.up_proj.weight": random(inter, hidden),
            f"{p}.mlp.down_proj.weight": random(hidden, inter),
        }))  # fmt: skip
    for name, tensors in shards:
        file = f"model-{name}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def disk_use(folder: Path, names: tuple[str, ...]) -> int:
    """Bytes of the files of the outputs ``names`` in ``folder``: each output and its hidden siblings (store,
    staging folder, finished work, spilled block, partial store)."""
    total = 0
    for top in folder.iterdir():
        if any(top.name == name or top.name.startswith((f".{name}", f"{name}.")) for name in names):
            for path in [top, *top.rglob("*")] if top.is_dir() else [top]:
                try:
                    total += path.stat().st_size if path.is_file() else 0
                except OSError:
                    continue  # removed while walked
    return total


def sample_disk(process: subprocess.Popen, folder: Path, names: tuple[str, ...], peak: list[int]) -> None:
    while process.poll() is None:
        peak[0] = max(peak[0], disk_use(folder, names))
        time.sleep(0.5)


class Sampler:
    """Peak resident memory of a process by phase (the phase its stderr shows): the kernel's high-water mark
    (VmHWM), read every ``interval`` seconds and reset when a phase starts, so a transient between two readings
    counts too (where /proc/PID/clear_refs cannot be written, the resident memory at each reading)."""

    def __init__(self, process: subprocess.Popen, marks: tuple[tuple[str, str], ...], interval: float = 0.1):
        self.process, self.marks, self.interval = process, marks, interval
        self.phase = "setup+capture"
        self.peaks: dict[str, int] = {}
        self.started = {self.phase: time.monotonic()}
        self.stderr: list[str] = []
        self.lock = threading.Lock()
        self.field = "VmHWM" if self._reset() else "VmRSS"

    def _reset(self) -> bool:
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def _read(self) -> int | None:
        try:
            lines = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(self.field + ":"))
        except (OSError, StopIteration):
            return None

    def _record(self) -> bool:
        value = self._read()
        if value is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
        return value is not None

    def read_stderr(self) -> None:
        assert self.process.stderr is not None
        for chunk in iter(lambda: self.process.stderr.read1(4096), b""):  # type: ignore[union-attr]
            text = chunk.decode(errors="replace")
            self.stderr.append(text)
            order = [phase for _, phase in self.marks]
            for mark, phase in self.marks:
                later = self.phase not in order or order.index(phase) > order.index(self.phase)
                if later and re.search(rf"\b{mark}\b", text):  # phases only move on
                    with self.lock:  # the old phase's peak, then the mark starts again for the new one
                        self._record()
                        self.phase = phase
                        self.started[phase] = time.monotonic()
                        if self.field == "VmHWM":
                            self._reset()

    def sample(self) -> None:
        while self.process.poll() is None:
            with self.lock:
                if not self._record():
                    break
            time.sleep(self.interval)


def parse_plan(stderr: str) -> dict[str, float]:
    """The GiB figures of the plan the command printed first."""
    plan = {}
    for line in stderr.splitlines():
        match = re.match(r"\s+(capture|calibration|decomposition|peak RAM|disk)\s+([\d.]+) GiB", line)
        if match and match[1] not in plan:
            plan[match[1]] = float(match[2])
    return plan


def sampled(command: list[str], marks: tuple, work: Path, names: tuple[str, ...], prefix: str = "") -> dict:
    """Run ``command`` while sampling its memory by phase (``marks``: the progress bar starting each) and the
    disk of ``names`` under ``work``: its wall, phase times and peaks (named with ``prefix``), its plan."""
    start = time.monotonic()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    sampler, disk_peak = Sampler(process, marks), [0]
    reader = threading.Thread(target=sampler.read_stderr, daemon=True)
    disk = threading.Thread(target=sample_disk, args=(process, work, names, disk_peak), daemon=True)
    reader.start()
    disk.start()
    sampler.sample()
    process.wait()
    reader.join(timeout=5)
    disk.join(timeout=5)
    wall = time.monotonic() - start
    stderr = "".join(sampler.stderr)
    if process.returncode != 0:
        sys.exit(f"{command[1]} failed ({process.returncode}):\n{stderr[-3000:]}")
    marks = sorted(sampler.started.items(), key=lambda item: item[1])
    times = {phase: (marks[i + 1][1] if i + 1 < len(marks) else start + wall) - t for i, (phase, t) in
             enumerate(marks)}  # fmt: skip
    times["setup+capture"] += sampler.started["setup+capture"] - start
    return {"wall": wall, "times": {prefix + k: v for k, v in times.items()},
            "peaks": {prefix + k: v for k, v in sampler.peaks.items()}, "plan": parse_plan(stderr),
            "disk": disk_peak[0]}  # fmt: skip


def record(args: argparse.Namespace, runs: list[dict], work: Path) -> dict:
    """One JSON line: each phase's time and peak, the plan the command printed, disk and output sizes."""
    if args.two_passes:
        plan = runs[0]["plan"] | runs[1]["plan"]
        plan["peak RAM"] = max(run["plan"].get("peak RAM", 0) for run in runs)
        plan["disk"] = sum(run["plan"].get("disk", 0) for run in runs)  # the store stays beside the output
    else:
        plan = runs[0]["plan"]
    peaks = {k: v for run in runs for k, v in run["peaks"].items()}
    peak = max(peaks.values())
    return {
        "shape": "smollm2" if args.readme else args.shape, "layers": 30 if args.readme else args.layers,
        "targets": "README command" if args.readme else args.targets,
        "wall_s": round(sum(run["wall"] for run in runs), 1),
        "phase_s": {k: round(v, 1) for run in runs for k, v in run["times"].items()},
        "peak_rss_gib": {k: round(v / GIB, 2) for k, v in peaks.items()},
        "peak_gib": round(peak / GIB, 2), "plan_gib": plan,
        "plan_error": round(plan["peak RAM"] / (peak / GIB) - 1, 3) if "peak RAM" in plan else None,
        "passes": 2 if args.two_passes or args.residual else 1,
        "keep_covariances": args.keep_covariances or args.two_passes,
        "peak_disk_gib": round(max(run["disk"] for run in runs) / GIB, 2),
        "output_gib": round(disk_use(work, ("out",)) / GIB, 2),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip


def largest_difference(ours: Path, theirs: Path) -> float:
    """The largest difference between two outputs' tensors (residual model and adapter), each relative to the
    larger of 1 and its tensor's largest magnitude in ``theirs``, one tensor at a time."""
    worst = 0.0
    for file in sorted(p.relative_to(theirs) for p in theirs.rglob("*.safetensors")):
        with safe_open(theirs / file, "pt") as expected, safe_open(ours / file, "pt") as found:
            for name in expected.keys():
                a, b = expected.get_tensor(name).double(), found.get_tensor(name).double()
                worst = max(worst, float((a - b).abs().max()) / max(1.0, float(a.abs().max())))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint and outputs [tmp].")
    parser.add_argument("--keep-covariances", action="store_true", help="convert's option: keep the store too")
    parser.add_argument("--two-passes", action="store_true", help="`calibrate`, then `decompose` from its store")
    parser.add_argument("--readme", action="store_true", help="the README's main command itself (one pass)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON lines file to append to [{RESULTS}]")
    parser.add_argument("--memory-budget", default=None, help="the commands' --memory-budget (e.g. 8GiB)")
    parser.add_argument("--residual", default=None, help="the commands' --residual (nf4, int4): a 4-bit residual")
    parser.add_argument("--shared", default=None,
                        help="what else ran on the machine meanwhile: recorded, and the wall times marked as not "
                             "comparable (the peaks are the process's own)")  # fmt: skip
    parser.add_argument("--keep-output", type=Path, default=None, help="move the output here for a later --against")
    parser.add_argument("--against", type=Path, default=None, help="an output to compare this run's tensors with")
    args = parser.parse_args()
    if args.readme and args.two_passes:
        parser.error("--readme runs the README's command: one pass")
    work = Path(tempfile.mkdtemp(prefix="big_layer-", dir=args.work))
    try:
        tool = str(Path(sys.executable).with_name("corda-surgery"))
        names = ("out", "cov.h5")
        if args.readme:  # the embedded SmolLM2 and its default calibration, exactly as the README says
            command = [tool, "convert", "--out", str(work / "out")]
        else:
            model = build_checkpoint(work / "model", args.shape, args.layers)
            text = work / "wikitext2.txt"
            shutil.copyfile(DATA, text)
            calibration = ["--data", str(text), "--samples", "16", "--seq-len", "512", "--batch-size", "4"]
            surgery = ["--rank", "16", "--mode", "kpm", "--targets", args.targets]
            command = [tool, "convert", str(model), *calibration, *surgery, "--out", str(work / "out")]
        if args.residual:
            residual = ["--residual", args.residual]
            command, surgery = [*command, *residual], [*surgery, *residual]
        if args.memory_budget:
            budget = ["--memory-budget", args.memory_budget]
            command, calibration, surgery = command + budget, calibration + budget, surgery + budget
        if args.two_passes:
            runs = [
                sampled([tool, "calibrate", str(model), *calibration, "--out", str(work / "cov.h5")], CALIBRATE,
                        work, names, "calibrate: "),
                sampled([tool, "decompose", str(model), "--covariances", str(work / "cov.h5"), *surgery, "--out",
                         str(work / "out")], DECOMPOSE, work, names, "decompose: "),
            ]  # fmt: skip
        else:
            # a 4-bit residual takes convert's two passes: the `tensors` bar is where it decomposes
            marks = (CALIBRATE + DECOMPOSE) if args.residual else ONE_PASS
            runs = [sampled(command + (["--keep-covariances"] if args.keep_covariances else []), marks, work, names)]
        result = record(args, runs, work) | {"memory_budget": args.memory_budget, "residual": args.residual}
        result |= {"shared_with": args.shared} if args.shared else {}
        if args.against is not None:
            result["largest_difference"] = largest_difference(work / "out", args.against)
        if args.keep_output is not None:
            shutil.move(work / "out", args.keep_output)
        args.results.parent.mkdir(exist_ok=True)
        with args.results.open("a") as file:
            file.write(json.dumps(result) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
