"""One streaming checkpoint rewriter: read a stored tensor, transform it, write it into the new shards.

Surgery (W → residual) and merge (residual → W + s·B·A) are transforms on it; peak memory stays near one
tensor (a fused experts parameter: the whole parameter, computed once and handed out piece by piece).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch
from tqdm.auto import tqdm

from corda_surgery.checkpoint.view import ModelView, StoredPieces
from corda_surgery.checkpoint.writer import copy_model_files, write_sharded_weights

# A stored key's new tensor, or None to keep it as stored.
Transform = Callable[[str], "torch.Tensor | None"]


def rewrite_checkpoint(
    view: ModelView,
    staging: Path,
    transform: Transform,
    *,
    fused: Collection[str] = (),
    transform_fused: Callable[[str], torch.Tensor] | None = None,
    max_shard_size: int | str,
    desc: str,
    progress: bool,
) -> None:
    """Write ``view``'s checkpoint into ``staging``: every stored tensor through ``transform``, the ``fused``
    parameters (module names) computed whole by ``transform_fused``, then the config and tokenizer files."""
    reader = view.reader
    pieces = StoredPieces(view, fused, transform_fused) if transform_fused is not None else None
    bar = tqdm(total=len(reader.locations), desc=desc, unit="tensor", disable=not progress)

    def produce(key: str) -> torch.Tensor:
        bar.update()
        piece = pieces.take(key) if pieces is not None else None
        if piece is not None:
            return piece
        tensor = transform(key)
        return tensor if tensor is not None else reader.copy(key)

    with bar:
        specs = {key: reader.spec(key) for key in reader.locations}
        write_sharded_weights(staging, specs, produce, max_shard_size=max_shard_size)
    copy_model_files(reader.model_dir, staging)
