"""The `telechat-ascend` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from telechat_ascend.backends import backend, backends
from telechat_ascend.chat import check_generation
from telechat_ascend.checkpoint import DTYPES, find_weights
from telechat_ascend.config import HF_KEY_PREFIX, PRESETS, TeleChatConfig
from telechat_ascend.convert import DEFAULT_SHARD_SIZE, MINDSPORE_FORMATS, TARGETS, convert_checkpoint
from telechat_ascend.errors import TeleChatError
from telechat_ascend.weights import detect_hf_prefix

ROPE_REPORT_LENGTHS = (4096, 8192, 16384, 32768)


def model_info(preset_or_folder: str) -> dict:
    """What `info` prints: sizes, tying, key style and the RoPE base the published NTK rule gives per length."""
    config = TeleChatConfig.load(preset_or_folder)
    key_style = "transformer.-prefixed" if config.hf_key_prefix else "unprefixed"
    weights_format = None
    if Path(preset_or_folder).is_dir():
        try:
            weights = find_weights(preset_or_folder)
        except TeleChatError:
            weights = None  # a folder with only config.json is still worth describing
        if weights is not None:
            weights_format = weights.format
            if weights.is_mindspore:
                key_style = "mindspore"
            else:
                key_style = "transformer.-prefixed" if detect_hf_prefix(weights.names()) == HF_KEY_PREFIX \
                    else "unprefixed"
    rope = {str(n): dict(zip(("base", "mscale"), config.rope_scaling(n))) for n in ROPE_REPORT_LENGTHS}
    return {
        "parameters": config.num_parameters(),
        "layers": config.n_layer,
        "hidden": config.hidden_size,
        "heads": config.n_head,
        "head_dim": config.head_dim,
        "kv_heads": config.kv_heads,
        "ffn_hidden": config.ffn_hidden_size,
        "vocab": config.vocab_size,
        "tied": config.tied,
        "key_style": key_style,
        "weights_format": weights_format,
        "rope_base_seqlen": config.rope_base_seqlen,
        "rope": rope,
    }


def _init(args: argparse.Namespace) -> None:
    from telechat_ascend.initialize import init_checkpoint  # trains a tokenizer for tiny presets: load on demand
    out = init_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype, force=args.force,
                          max_shard_size=args.max_shard_size, progress=not args.quiet)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}, {args.dtype}) to {out}")


def _info(args: argparse.Namespace) -> None:
    print(json.dumps(model_info(args.model), indent=2))


def _convert(args: argparse.Namespace) -> None:
    report = convert_checkpoint(args.src, args.dst, to=args.to, dtype=args.dtype, fmt=args.format, force=args.force,
                                max_shard_size=args.max_shard_size, progress=not args.quiet)
    print(f"converted {report.tensors} tensors ({report.bytes / 1e9:.3f} GB) to {args.to} in {report.output}; "
          f"copied {', '.join(report.side_files) or 'no side files'}")
    if report.skipped_training_state:
        print(f"dropped {len(report.skipped_training_state)} training-state entries (optimizer moments, step "
              f"counters), e.g. {report.skipped_training_state[0]}")


def _load_backend(args: argparse.Namespace):
    """(inference module, model, tokenizer) of --backend; every backend's module offers the same functions."""
    inference = backend(args.backend).load()
    model, tokenizer = inference.load_model(args.model, args.device, args.dtype)
    return inference, model, tokenizer


def _generation_kwargs(args: argparse.Namespace) -> dict:
    """Only what was given: the rest comes from the model's generation_config.json."""
    names = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        return check_generation(given)
    except TeleChatError as error:
        raise TeleChatError(f"--{str(error).replace('_', '-', 2)}") from None


def _generate(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise TeleChatError("--prompt is empty: give the text to continue")
    kwargs = _generation_kwargs(args)
    inference, model, tokenizer = _load_backend(args)
    print(inference.generate_text(model, tokenizer, args.prompt, **kwargs))


def _chat(args: argparse.Namespace) -> None:
    kwargs = _generation_kwargs(args)
    inference, model, tokenizer = _load_backend(args)
    questions = args.question or (line.strip() for line in sys.stdin if line.strip())
    inference.chat_session(model, tokenizer, questions, **kwargs)


def _serve(args: argparse.Namespace) -> None:
    import uvicorn
    from telechat_ascend.chat import GENERATION_DEFAULTS
    from telechat_ascend.engine import Engine
    from telechat_ascend.files import read_json_object
    from telechat_ascend.server import create_app
    for name in ("max_batch_size", "max_queue", "prefill_chunk", "port"):
        if getattr(args, name) < 1:
            raise TeleChatError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    inference = backend(args.backend).load()
    if not hasattr(inference, "batch_runner"):
        raise TeleChatError(f"--backend {args.backend} has no serving runner yet; serve with --backend torch")
    config = TeleChatConfig.from_file(args.model)
    defaults = check_generation({**GENERATION_DEFAULTS,
                                 **read_json_object(args.model / "generation_config.json", missing_ok=True)})
    model, tokenizer = inference.load_model(args.model, args.device, args.dtype)
    max_model_len = args.max_model_len or config.seq_length or config.training_seqlen
    engine = Engine(inference.batch_runner(model, args.max_batch_size), tokenizer, args.max_batch_size,
                    args.max_queue, max_model_len, args.prefill_chunk)
    app = create_app(engine, tokenizer, args.served_model_name or args.model.name, defaults, config.seq_length,
                     args.api_key)
    print(f"serving {args.model} ({args.backend}, max batch {args.max_batch_size}, max_model_len {max_model_len}) on "
          f"http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _parity(args: argparse.Namespace) -> int:
    from telechat_ascend import parity
    if args.backends:
        if not (args.model and args.data):
            raise TeleChatError("--backends needs --model DIR and --data DIR (prepare-data shards)")
        backends = tuple(args.backends.split(","))
        labels = backends
        result = parity.run_backends(args.model, args.data, args.steps or 10, args.out, backends)
    elif args.log and args.reference:
        labels = (str(args.log), str(args.reference))
        run, reference = parity.read_losses(args.log), parity.read_losses(args.reference)
        if args.steps is not None:
            if args.steps < 1:
                raise TeleChatError(f"--steps must be >= 1, got {args.steps}")
            run, reference = ({s: v for s, v in log.items() if s <= args.steps} for log in (run, reference))
        result = parity.compare_losses(run, reference)
    else:
        raise TeleChatError("give --log RUN_LOG --reference REFERENCE_LOG, or --backends torch,mindspore --model DIR "
                            "--data DIR")
    if args.plot:
        parity.plot(result, args.plot, labels)
    if args.json:
        parity.write_json(result, args.json, labels)
    print(result.summary())
    return 0 if result.passed else 1


def _bench(args: argparse.Namespace) -> None:
    from telechat_ascend import throughput
    run = throughput.read_throughput(args.log, args.devices, args.seq_len)
    peak = args.peak_tflops or throughput.PEAK_TFLOPS.get(args.device_type)
    print(throughput.report(run, TeleChatConfig.load(args.model), peak, args.compare))


def _add_inference_arguments(parser: argparse.ArgumentParser, generation: bool = True) -> None:
    names = list(backends())
    parser.add_argument("--backend", choices=names, default="torch" if "torch" in names else None,
                        required="torch" not in names, help="the installed backends (entry points)")
    parser.add_argument("--model", required=True, type=Path, help="a TeleChat model folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N], npu[:N] or auto")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="default: the chip's preferred dtype")
    if not generation:
        return
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telechat-ascend",
                                     description="Train and serve TeleChat on Ascend NPUs (MindSpore and torch-npu).")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="write a randomly initialised HF-format checkpoint")
    init.add_argument("--preset", required=True, choices=list(PRESETS))
    init.add_argument("--out", required=True, type=Path)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    init.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE)
    init.add_argument("--force", action="store_true", help="replace an existing output folder")
    init.add_argument("--quiet", action="store_true", help="no progress bar")
    init.set_defaults(run=_init)

    info = commands.add_parser("info", help="describe a model folder or preset as JSON")
    info.add_argument("model", help=f"a model folder or one of {', '.join(PRESETS)}")
    info.set_defaults(run=_info)

    convert = commands.add_parser("convert", help="convert weights between HF and MindSpore layouts")
    convert.add_argument("--to", required=True, choices=TARGETS)
    convert.add_argument("src", type=Path)
    convert.add_argument("dst", type=Path)
    convert.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast floating tensors (default: keep)")
    convert.add_argument("--format", choices=MINDSPORE_FORMATS, default="ckpt",
                         help="MindSpore output format (with --to mindspore)")
    convert.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="safetensors shard size, e.g. 2GB")
    convert.add_argument("--force", action="store_true", help="replace an existing output folder")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=_convert)

    generate = commands.add_parser("generate", help="continue a text with a model")
    _add_inference_arguments(generate)
    generate.add_argument("--prompt", required=True)
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="chat with a model, streaming the answers")
    _add_inference_arguments(chat)
    chat.add_argument("--question", action="append",
                      help="a question (repeat for a multi-turn chat); default: one question per stdin line")
    chat.set_defaults(run=_chat)

    serve = commands.add_parser("serve", help="an OpenAI-compatible server with continuous batching")
    _add_inference_arguments(serve, generation=False)
    serve.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests; past it: 429")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="prompt + answer tokens per request (default: config seq_length or training_seqlen)")
    serve.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step")
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (default: folder name)")
    serve.set_defaults(run=_serve)

    from telechat_ascend.data import add_prepare_data_parser
    add_prepare_data_parser(commands)

    parity = commands.add_parser("parity", help="compare a run's loss log with a reference log (exit 1 on failure)")
    parity.add_argument("--log", type=Path, help="the run's loss log (JSON lines or DeepSpeed console output)")
    parity.add_argument("--reference", type=Path, help="the reference (e.g. A100) loss log")
    parity.add_argument("--backends", help="(a) train both, e.g. torch,mindspore, and compare their losses")
    parity.add_argument("--model", type=Path, help="with --backends: the HF folder both start from")
    parity.add_argument("--data", type=Path, help="with --backends: prepare-data shards")
    parity.add_argument("--steps", type=int, default=None,
                        help="with --backends: optimizer steps to train (default 10); with --log: compare only the "
                             "first N steps")
    parity.add_argument("--out", type=Path, default=Path("runs/parity"), help="with --backends: the runs' folder")
    parity.add_argument("--plot", type=Path, help="write both curves and their difference to this PNG")
    parity.add_argument("--json", type=Path, help="write the verdict to this JSON file")
    parity.set_defaults(run=_parity)

    bench = commands.add_parser("bench", help="throughput of a training log next to the published figures")
    bench.add_argument("--log", required=True, type=Path, help="a trainer's JSON-lines loss log")
    bench.add_argument("--model", required=True, help=f"the trained model's folder or one of {', '.join(PRESETS)}")
    bench.add_argument("--devices", type=int, help="default: the log's world_size")
    bench.add_argument("--seq-len", type=int, help="default: the log's seq_len")
    bench.add_argument("--device-type", choices=["a100", "h100", "910a", "910b"], default="910b",
                       help="for the MFU peak FLOP/s")
    bench.add_argument("--peak-tflops", type=float, help="the device's dense fp16/bf16 peak (overrides the table)")
    bench.add_argument("--compare", choices=["7B", "12B"], help="only the published rows of this model")
    bench.set_defaults(run=_bench)

    for installed in backends().values():  # their extra subcommands (int8 quantization, ...)
        for name, (text, add) in installed.commands.items():
            add(commands, text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except TeleChatError as error:
        print(f"telechat-ascend {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
