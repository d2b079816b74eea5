"""What a decomposition run has finished, kept beside its output so that a killed run can go on from there.

Each decomposed target's factors and record are saved as soon as they exist (small: r·(in + out) numbers); a
resumed run takes them instead of decomposing again and rebuilds the residual from them bit for bit
(``residual_of``), then writes the output as an uninterrupted run would. The folder records what the run was
(options, model, stores, device); a resume against anything else is refused naming what differs. It is removed
when the output is published, by an error in the run that made it, and by a later run that does not resume; a
kill or a signal leaves it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from corda_surgery import __version__
from corda_surgery.decomposition.solvers import MemoryShortfall
from corda_surgery.distributed import DistributedError
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.outputs import OutputError
from corda_surgery.surgery.report import LayerRecord, read_report

log = logging.getLogger(__name__)
HEADER = "run.json"


class ResumeError(CordaSurgeryError):
    """A resume against another run, or a folder of finished work that cannot be read; names what differs."""


def resume_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.resume"


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted names of the fields where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(old.keys() | new.keys())
        return [name for key in keys for name in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".") or "the run"]


class FinishedWork:
    """The targets a run has decomposed so far, by name: saved as they come, read back on resume."""

    def __init__(self, out: Path, run: dict[str, Any], *, resume: bool):
        self.folder, self.run = resume_folder(out), run
        self.done: dict[str, Path] = {}
        self.created = not (resume and (self.folder / HEADER).is_file())  # else its work predates this run
        if not self.created:
            self._reopen()
        else:
            if self.folder.exists():
                shutil.rmtree(self.folder)
                log.warning("removed %s: finished work of an earlier run (resume to continue it)", self.folder)
            self.folder.mkdir()
            _write_atomically(self.folder / HEADER, json.dumps(run, indent=2, sort_keys=True).encode())
        if self.done:
            log.warning("resuming: %d target(s) already decomposed in %s", len(self.done), self.folder)

    def _reopen(self) -> None:
        try:
            saved = json.loads((self.folder / HEADER).read_text())
        except (OSError, ValueError) as exc:
            raise ResumeError(
                f"{self.folder / HEADER}: unreadable ({exc}); remove {self.folder} to start again"
            ) from exc
        differing = _differences(saved, json.loads(json.dumps(self.run)))
        if differing:
            raise ResumeError(
                f"{self.folder}: the interrupted run differs in {', '.join(differing)}; rerun it as it was, or "
                "drop `resume` to start again"
            )
        for path in self.folder.glob("*.safetensors"):
            self.done[_name_of(path)] = path

    def take(self, name: str) -> tuple[torch.Tensor, torch.Tensor, LayerRecord] | None:
        """A finished target's A, B and record; None where this run has not decomposed it yet."""
        path = self.done.get(name)
        if path is None:
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                record = LayerRecord.from_json(json.loads(handle.metadata()["record"]))
                return handle.get_tensor("lora_A"), handle.get_tensor("lora_B"), record
        except (OSError, KeyError, TypeError, ValueError, safetensors.SafetensorError) as exc:
            raise ResumeError(f"{path}: unreadable ({exc}); remove {self.folder} to start again") from exc

    def keep(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, record: LayerRecord) -> None:
        path = self.folder / f"{len(self.done):06d}.safetensors"
        staging = path.with_suffix(".partial")
        metadata = {"target": name, "record": json.dumps(record.to_json())}
        try:
            save_file({"lora_A": lora_a.contiguous(), "lora_B": lora_b.contiguous()}, str(staging), metadata=metadata)
            _sync_and_rename(staging, path)
        except (OSError, safetensors.SafetensorError) as exc:  # a full disk: one line naming the file
            raise OutputError(f"{staging}: cannot save the finished decomposition ({exc})") from exc
        self.done[name] = path

    def keep_layer(self, layer: int, entries: list[dict[str, Any]]) -> None:
        """Block ``layer`` is decomposed whole (``convert``'s one pass): its inputs' entries, for the report and
        for a resume, which then need not sum it again."""
        path = self.folder / f"layer-{layer:06d}.json"
        try:
            _write_atomically(path, json.dumps(entries).encode())
        except OSError as exc:
            raise OutputError(f"{path}: cannot save the finished block ({exc.strerror or exc})") from exc

    def layers(self) -> list[list[dict[str, Any]]]:
        """The entries of the blocks ``keep_layer`` saved, from block 0 up to the first missing."""
        found: list[list[dict[str, Any]]] = []
        while (path := self.folder / f"layer-{len(found):06d}.json").is_file():
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                raise ResumeError(f"{path}: unreadable ({exc}); remove {self.folder} to start again") from exc
        return found

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self, failure: BaseException) -> None:
        """After a failed run: an error removes what this run made; a kill, a signal, a lost rank (the other
        ranks stop with a DistributedError) or a target's fallback short of memory leaves the decompositions it
        finished for --resume, as a resumed run's earlier work always is. A run that finished none leaves nothing."""
        stopped = not isinstance(failure, Exception) or isinstance(failure, DistributedError | MemoryShortfall)
        if self.created and not (stopped and self.done):
            self.remove()


def _name_of(path: Path) -> str:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata()["target"]
    except (OSError, KeyError, TypeError, safetensors.SafetensorError) as exc:
        raise ResumeError(f"{path}: unreadable ({exc}); remove {path.parent} to start again") from exc


def _write_atomically(path: Path, data: bytes) -> None:
    staging = path.with_suffix(".partial")
    staging.write_bytes(data)
    _sync_and_rename(staging, path)


def _sync_and_rename(staging: Path, path: Path) -> None:
    with staging.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, path)


def run_record(options: Any, fingerprint: str, stores: Sequence[Any], compute: Any) -> dict[str, Any]:
    """What makes a decomposition the same run: its options, model, stores and device (not where it is written)."""
    return {
        "options": options.record(),
        "model_fingerprint": fingerprint,
        "stores": [{"model_fingerprint": s.fingerprint, "calibration": s.calibration} for s in stores],
        "compute": compute.record(),
        "corda_surgery": __version__,
    }


def check_finished_output(out: Path, run: dict[str, Any]) -> None:
    """``out`` is a finished surgery of this very run (``resume`` then has nothing to do), or an error naming
    what differs."""
    report = read_report(out)
    written = {
        "options": report.options,
        "model_fingerprint": report.model_fingerprint,
        "stores": [
            {"model_fingerprint": s.model_fingerprint, "calibration": s.calibration} for s in report.covariance_stores
        ],
        "compute": report.compute,
        "corda_surgery": report.versions.get("corda_surgery"),
    }
    differing = _differences(written, json.loads(json.dumps(run)))
    if differing:
        raise ResumeError(
            f"{out}: a finished output of another run (it differs in {', '.join(differing)}); "
            "write elsewhere, or use `overwrite`"
        )
    log.warning("%s: already complete; nothing to do (resume)", out)
    shutil.rmtree(resume_folder(out), ignore_errors=True)  # left by a kill after publishing
