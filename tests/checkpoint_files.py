"""Checkpoint folders for tests, read and written with the libraries themselves (not the code under test)."""

import json
import shutil

import torch
from safetensors import safe_open


def load_safetensors_folder(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as file:
            tensors.update({name: file.get_tensor(name) for name in file.keys()})
    return tensors


def write_bin_shards(source, folder, dtype):
    """A published-style pytorch_model-0000i-of-0000N.bin folder with index, written by torch.save."""
    folder.mkdir()
    tensors = load_safetensors_folder(source)
    names = list(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for number, part in enumerate(halves, start=1):
        file_name = f"pytorch_model-{number:05d}-of-00002.bin"
        torch.save({n: torch.from_numpy(tensors[n]).to(dtype) for n in part}, folder / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    total_size = sum(t.nbytes for t in tensors.values()) * torch.finfo(dtype).bits // 32
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for side_file in ("config.json", "generation_config.json"):
        shutil.copy(source / side_file, folder / side_file)
    return {n: torch.from_numpy(t).to(dtype) for n, t in tensors.items()}
