"""Reads every tensor of a folder's safetensors files with the safetensors library itself (not the code under test)."""

from safetensors import safe_open


def load_safetensors_folder(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as file:
            tensors.update({name: file.get_tensor(name) for name in file.keys()})
    return tensors
