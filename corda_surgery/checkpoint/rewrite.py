"""One streaming checkpoint rewriter: read a stored tensor, transform it, write it into the new shards.

Surgery (W → residual) and merge (residual → W + s·B·A) are transforms on it; peak memory stays near one
tensor (a fused experts parameter: the whole parameter, computed once and handed out piece by piece).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from corda_surgery.checkpoint.view import ModelView, StoredPieces
from corda_surgery.checkpoint.writer import copy_model_files, write_sharded_weights

# A stored key's new tensor, or None to keep it as stored; for a key ``layout`` replaces, its new tensors by name.
Transform = Callable[[str], "torch.Tensor | dict[str, torch.Tensor] | None"]
Spec = tuple[tuple[int, ...], torch.dtype]


def rewrite_checkpoint(
    view: ModelView,
    staging: Path,
    transform: Transform,
    *,
    fused: Collection[str] = (),
    transform_fused: Callable[[str], torch.Tensor] | None = None,
    layout: Mapping[str, dict[str, Spec]] | None = None,
    max_shard_size: int | str,
    desc: str,
    progress: bool,
) -> None:
    """Write ``view``'s checkpoint into ``staging``: every stored tensor through ``transform``, the ``fused``
    parameters (module names) computed whole by ``transform_fused``, then the config and tokenizer files. A key
    in ``layout`` is stored as the tensors it names (a quantised weight's codes and scales), which ``transform``
    gives together the first time one of them is written."""
    reader, layout = view.reader, layout or {}
    pieces = StoredPieces(view, fused, transform_fused) if transform_fused is not None else None
    source = {name: key for key, names in layout.items() for name in names}
    pending: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(reader.locations), desc=desc, unit="tensor", disable=not progress)

    def produce(name: str) -> torch.Tensor:
        key = source.get(name, name)
        if key in layout:
            if not any(other in pending for other in layout[key]):
                bar.update()
                made = transform(key)
                names = sorted(made) if isinstance(made, dict) else None
                if names != sorted(layout[key]):
                    raise ValueError(f"{key}: made the tensors {names}, planned {sorted(layout[key])}")
                assert isinstance(made, dict)
                pending.update(made)
            return pending.pop(name)
        bar.update()
        piece = pieces.take(key) if pieces is not None else None
        if piece is not None:
            return piece
        tensor = transform(key)
        assert not isinstance(tensor, dict), f"{key}: no layout names several tensors for it"
        return tensor if tensor is not None else reader.copy(key)

    with bar:
        taken = [name for name in source if name in reader.locations and source[name] != name]
        if taken:
            raise ValueError(f"{taken[0]}: planned for {source[taken[0]]}, but the checkpoint stores it already")
        specs: dict[str, Spec] = {}
        for key in reader.locations:
            specs.update(layout[key] if key in layout else {key: reader.spec(key)})
        write_sharded_weights(staging, specs, produce, max_shard_size=max_shard_size)
    copy_model_files(reader.model_dir, staging)
