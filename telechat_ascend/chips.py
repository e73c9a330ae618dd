"""Which quantized layers and folder formats each Ascend chip runs: the one table the quantizer, the loaders and
the int8/int4 layers consult (the dtype policy, 310P fp16 only, is pytorch_npu.device's). The README's support
matrix lists the same.

Layers (pytorch_npu.quant): w8a16 per channel, w8a16 with groups (also 8-bit GPTQ folders: groups of 128), w4a16
(4-bit GPTQ folders), w8a8 (static activation scale). Formats: "ours" (`quantize`), "gptq" (Tele-AI's releases),
"msmodelslim" (what MindIE and vllm-ascend load).
"""

from __future__ import annotations

from telechat_ascend.errors import TeleChatError

NO_310P_GROUPS = ("npu_weight_quant_batchmatmul takes no antiquant_group_size on Atlas 300I (310P): quantize the "
                  "float model per channel (--method w8a16 without --group-size, or w8a8); the published GPTQ int8 "
                  "folders use groups of 128 and run on Atlas A2/A3")
NO_310P_INT4 = ("Atlas 300I (310P) has no int4 matmul (npu_weight_quant_batchmatmul takes int8 weights there): run a "
                "4-bit GPTQ folder on an Atlas A2/A3, or quantize the float model with --method w8a8 or w8a16")
NO_310P_MSMODELSLIM_W8A16 = ("vllm-ascend on Atlas 300I (310P) loads the msModelSlim schemes W8A8, W8A8_DYNAMIC, "
                             "W8A8S and W8A8SC only, and MindIE has no W8A16 for TeleChat: use --method w8a8 for "
                             "this card (our own backend runs W8A16 on 310P from our format)")

# chip -> (layer, format) -> why it is refused; absent = supported. Layer "w8a16-groups" is w8a16 with group scales.
REFUSED = {
    "310p": {("w8a16-groups", fmt): NO_310P_GROUPS for fmt in ("ours", "gptq", "msmodelslim")}
    | {("w4a16", fmt): NO_310P_INT4 for fmt in ("ours", "gptq")}
    | {("w8a16", "msmodelslim"): NO_310P_MSMODELSLIM_W8A16},
}


def check_quantization_for_chip(chip: str | None, method: str, group_size: int = 0, fmt: str = "ours") -> None:
    """Raise TeleChatError with the reason when `chip` cannot run `method` (w8a16, w8a8, w4a16) from `fmt`."""
    layer = "w8a16-groups" if method == "w8a16" and group_size else method
    reason = REFUSED.get(chip or "", {}).get((layer, fmt))
    if reason:
        raise TeleChatError(reason)
