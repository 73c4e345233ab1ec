"""Verification on a target domain: the stored crops of the chosen faces, degraded, then re-embedded.

``jobs.evaluate --degrade lowres:16`` (or ``jpeg:10+gray``, ``mask``, ``blur:2``) measures a model where
a user's cameras are, without preparing anything again: the evaluation picks one face per image as
usual, degrades its stored aligned crop with :func:`workers.faces.degrade.degrade` (deterministically
per image: keyed by image_id) and embeds it with the chosen embedder.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.compute as pc

import schemas as S
from workers import dataset
from workers.records import decode_crops


def degraded_embeddings(root: str, image_ids: np.ndarray, face_index: np.ndarray, spec: str, embedder: str,
                        storage_options: dict | None = None, batch_size: int = 0) -> np.ndarray:
    """Embeddings of the given faces' stored crops after the degradation ``spec``.

    Args:
        root: dataset root.
        image_ids: object[M] image of each face wanted.
        face_index: int[M] its face_index.
        spec: a :func:`workers.faces.degrade.parse_degrade` spec ("clean" = the stored crops as they are).
        embedder: registry name or exported embedder directory.
        storage_options: fsspec options.
        batch_size: crops per forward pass (0: by device).

    Returns:
        float32[M, D] unit vectors, in the order of ``image_ids``.

    Raises:
        ValueError: a bad spec, or a wanted face without a stored crop.
    """
    from workers.faces.degrade import degrade, parse_degrade
    from workers.faces.embedders import load_embedder

    steps = parse_degrade(spec)
    wanted = pd.unique(pd.Series(image_ids, dtype=object))
    table = dataset.read_table(root, S.FACES, storage_options, columns=[S.IMAGE_ID, S.FACE_INDEX, S.CROP],
                               filter=pc.field(S.IMAGE_ID).isin(list(wanted)))
    have = pd.MultiIndex.from_arrays([table.column(S.IMAGE_ID).to_numpy(zero_copy_only=False),
                                      table.column(S.FACE_INDEX).to_numpy()])
    pos = have.get_indexer(pd.MultiIndex.from_arrays([np.asarray(image_ids, dtype=object),
                                                      np.asarray(face_index)]))
    if (pos < 0).any():
        raise ValueError(f"{int((pos < 0).sum())} faces have no stored crop in {root!r}")
    crops = decode_crops(table.column(S.CROP).take(pos))
    if steps:
        crops = degrade(crops, steps, [str(i) for i in image_ids])
    return load_embedder(embedder).embed(crops, batch_size=batch_size)
