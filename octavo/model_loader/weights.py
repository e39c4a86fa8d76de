"""Iterate checkpoint tensors from a Hugging Face folder without unpickling untrusted data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


def safetensors_files(folder: Path) -> list[Path]:
    """All shards, in the order the index names them when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.bin") if p.name != "training_args.bin") + sorted(folder.glob("*.pt"))


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def iter_pickle(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Only reached when the user opted in; ``weights_only`` still refuses arbitrary objects."""
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def iter_checkpoint(folder: Path, allow_pickle: bool) -> Iterator[tuple[str, torch.Tensor]]:
    files = safetensors_files(folder)
    if files:
        return iter_safetensors(files)
    pickled = pickle_files(folder)
    if pickled:
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds only pickled weights ({pickled[0].name}); pickle files can run code when "
                "loaded. Convert them to safetensors, or pass allow_pickle_weights=True (--allow-pickle-weights) "
                "if you trust their source."
            )
        return iter_pickle(pickled)
    raise FileNotFoundError(f"no *.safetensors weights found in {folder}.")
