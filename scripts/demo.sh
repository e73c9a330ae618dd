#!/usr/bin/env bash
# The main job on the CPU: a tiny TeleChat checkpoint through HF -> MindSpore -> HF, checked bit for bit.
source "$(dirname "$0")/env.sh"
out=runs/demo
rm -rf "$out" && mkdir -p "$out"

telechat-ascend init --preset tiny --seed 0 --out "$out/hf"
telechat-ascend info "$out/hf"
telechat-ascend convert --to mindspore "$out/hf" "$out/mindspore"
telechat-ascend convert --to hf "$out/mindspore" "$out/hf-again"
# Same tensors in the same order with the same shard size: the round trip must give the very same file.
cmp "$out/hf/model.safetensors" "$out/hf-again/model.safetensors"
echo "round trip HF -> MindSpore -> HF is bit-exact: $out/hf-again"
