"""The PyTorch backend as the core sees it (entry point `torch` of telechat_ascend.backends): where its inference
functions and trainer live, and its extra subcommands. Imports no framework: the CLI builds its --help from here."""

from __future__ import annotations

from pathlib import Path

from telechat_ascend.backends import Backend

QUANT_METHODS = ("w8a16", "w8a8", "gptq")
FORMATS = ("ours", "msmodelslim")  # msmodelslim: what MindIE and vllm-ascend load
CALIB_SAMPLES = 32  # prompts read from --calib
CALIB_TOKENS = 256  # each truncated to this many tokens
# GPTQ estimates a K x K Hessian per linear (K up to 12288): the paper's calibration, 128 segments of 2048 tokens.
GPTQ_CALIB_SAMPLES, GPTQ_CALIB_TOKENS = 128, 2048


def _run(function_name: str):
    def run(args):
        from pytorch_npu import quantize
        return getattr(quantize, function_name)(args)
    return run


def add_quantize(subparsers, help: str) -> None:
    quantize = subparsers.add_parser("quantize", help=help)
    quantize.add_argument("--method", required=True, choices=QUANT_METHODS)
    quantize.add_argument("--model", required=True, type=Path, help="the float TeleChat folder")
    quantize.add_argument("--out", required=True, type=Path)
    quantize.add_argument("--calib", type=Path, help=f"jsonl of calibration prompts (first {CALIB_SAMPLES} used, "
                          f"{CALIB_TOKENS} tokens each; gptq: {GPTQ_CALIB_SAMPLES}, {GPTQ_CALIB_TOKENS} tokens each); "
                          f"required for w8a8, gptq and --keep-float")
    quantize.add_argument("--group-size", type=int, default=None,
                          help="one scale per this many inputs (a multiple of 32); w8a16 default 0 = per output "
                               "channel, gptq default 128")
    quantize.add_argument("--format", choices=FORMATS, default="ours",
                          help="msmodelslim: quant_model_weights + quant_model_description.json (MindIE, vllm-ascend)")
    quantize.add_argument("--bits", type=int, choices=[4, 8], default=8, help="gptq: 8 or 4-bit codes")
    quantize.add_argument("--damp-percent", type=float, default=0.01,
                          help="gptq: dampening added to the Hessian's diagonal, as a share of its mean")
    quantize.add_argument("--lm-head", action="store_true",
                          help="gptq: quantize the output head too (GPTQModel's lm_head: true; models with a head of "
                               "their own only, e.g. 12B); the published folders keep it fp16")
    quantize.add_argument("--keep-float", type=int, default=0,
                          help="keep the N linears with the largest calibration error in float (one forward pass "
                               "per linear)")
    quantize.add_argument("--alpha", type=float, default=0.5, help="w8a8 smoothing strength (SmoothQuant α)")
    quantize.add_argument("--soc", choices=["310p"], help="check the result runs on this chip (Atlas 300I Pro)")
    quantize.add_argument("--force", action="store_true", help="replace an existing output folder")
    quantize.set_defaults(run=_run("run_quantize"))


def add_eval_quant(subparsers, help: str) -> None:
    evaluate = subparsers.add_parser("eval-quant", help=help)
    evaluate.add_argument("--float", dest="float_model", required=True, type=Path)
    evaluate.add_argument("--int8", dest="int8_model", required=True, type=Path)
    evaluate.add_argument("--text", required=True, type=Path, help="a UTF-8 text file to score")
    evaluate.add_argument("--seq-len", type=int, default=256, help="tokens predicted per window")
    evaluate.add_argument("--max-tokens", type=int, default=20000, help="score at most this many tokens")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda[:N], npu[:N] or auto")
    evaluate.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                          help="default: the chip's preferred dtype")
    evaluate.add_argument("--soc", choices=["310p"], help="evaluate under this chip's policy (310p: fp16 only)")
    evaluate.set_defaults(run=_run("run_eval"))


BACKEND = Backend(
    name="torch", extra="torch", inference="pytorch_npu.inference",
    trainer=("-m", "pytorch_npu.train", "--device", "cpu"),
    commands={"quantize": ("write an int8 (w8a16, w8a8) or GPTQ int8/int4 copy of a model", add_quantize),
              "eval-quant": ("perplexity and greedy agreement of an int8 model against its float model",
                             add_eval_quant)})
