"""owl3-export command line. Thin: each command maps onto library calls; errors follow the exit-code contract."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from owl3.errors import EnvironmentProblem, GateFailure, InvalidInputError, Owl3Error
from owl3.export.cli import (
    add_build_engine_parser,
    add_check_trt_parser,
    add_export_parser,
    cmd_build_engine,
    cmd_check_trt,
    cmd_export_stage,
)
from owl3.quantize.cli import add_quantize_parser, cmd_quantize
from owl3.runtime.cli import add_prompt_options, add_run_parser, cmd_run, decoding_options
from owl3.validate.cli import add_validate_parser, cmd_validate

PIPELINE = """\
pipeline (each step writes a directory with a manifest):
  checkpoint -> reference model -> quantize -> export ONNX -> build engine -> runtime -> validate -> report

available in this version:
  owl3-export --precision fp32|fp16|int8|int4|w8a8 [--model DIR] [--output DIR] [--target ort|tensorrt|both]
             the pipeline: (quantize ->) export ONNX graphs (vision, visual memory, decoder with KV cache),
             validate each against PyTorch, and write one drift report. It writes DIR (ONNX Runtime
             flavour: fused operators, in-place KV cache), DIR-trt (TensorRT flavour: standard operators,
             Q/DQ when quantized), DIR-report, and for quantized precisions DIR-gptq (the checkpoint)
  quantize   GPTQ int4 / int8 / W8A8 with image+text calibration, into a GPTQ-format checkpoint
             (owl3-export quantize --precision int4 [--model DIR] [--calibration SRC] --output DIR)
  export     one export from a float or a quantized checkpoint
             (owl3-export export --model DIR [--target ort|tensorrt] --output DIR)
  check-trt  what the TensorRT 10.3 / 11.1 ONNX parsers would reject in an export, node by node
  build-engine  TensorRT engines from an export, on the device (UNVERIFIED: never run with TensorRT here)
  run        answer a prompt from an export directory with the torch-free runtime (ONNX Runtime, or
             --engines DIR: its TensorRT engines, UNVERIFIED)
  validate   compare backends at every level (tensors, next-token, tasks) and write drift reports
  generate   run the PyTorch reference model on a prompt with images or a video, streaming the answer
  info       check a checkpoint strictly and print its configuration and parameter count

With no --model, commands use the small default model shipped in the package (the real architecture,
trained on a synthetic shapes task; owl3/demo_model/TRAINING.md), so every command works on a fresh
machine without any download.

exit codes: 0 ok, 2 usage, 3 invalid input, 4 environment, 5 resources, 6 accuracy gate, 130 interrupted
"""

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="owl3-export",
        description="Export mPLUG-Owl3 to ONNX / TensorRT for edge GPUs, and run its reference model.",
        epilog=PIPELINE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    pipeline = parser.add_argument_group("the export pipeline (no command)")
    pipeline.add_argument(
        "--precision", choices=("fp32", "fp16", "int8", "int4", "w8a8"), help="export precision; runs the pipeline"
    )
    pipeline.add_argument(
        "--target", choices=("ort", "tensorrt", "both"), default="both",
        help="the ONNX Runtime flavour (fused operators), the TensorRT flavour (standard operators), or both (default)",
    )  # fmt: skip
    pipeline.add_argument("--model", dest="pipeline_model", type=Path, help="checkpoint directory (default: demo)")
    pipeline.add_argument("--output", type=Path, help="export directory (default: exports/<model>-<precision>)")
    pipeline.add_argument("--force", action="store_true", help="replace an existing export directory of ours")
    pipeline.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    pipeline.add_argument(
        "--benchmark", action="append", default=[], help="NAME:DIR benchmark subset for the drift report (repeatable)"
    )
    pipeline.add_argument("--limit", type=int, default=40, help="scoring units per benchmark in the drift report")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_quantize_parser(commands)
    add_export_parser(commands)
    add_check_trt_parser(commands)
    add_build_engine_parser(commands)
    add_run_parser(commands)
    add_validate_parser(commands)
    _add_generate(commands)
    info = commands.add_parser("info", help="check a checkpoint and print its configuration")
    _add_model_options(info)
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="Hugging Face checkpoint directory (default: the demo model)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")


def _add_generate(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser(
        "generate",
        help="run the PyTorch reference model and stream the answer",
        description="Answer a prompt about images or a video with the PyTorch reference model.",
    )
    _add_model_options(gen)
    add_prompt_options(gen)


def resolve_model_dir(path: Path | None) -> Path:
    """``--model``, checked to be a directory; without one, the default demo model (with a note)."""
    if path is not None:
        if not path.is_dir():
            raise InvalidInputError(
                f"expected a model directory, found {'a file' if path.exists() else 'nothing'}",
                where=str(path),
                fix="pass a Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)",
            )
        return path
    from owl3.demo import default_model_dir, packaged_model_dir

    model_dir = default_model_dir()
    if model_dir == packaged_model_dir():
        _note("no --model given: using the built-in demo model (trained on synthetic shapes, real architecture)")
    else:
        _note("no --model given: using a seeded random demo model (the package ships no trained one)")
    return model_dir


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def model_name(model_dir: Path) -> str:
    """The directory's name; the packaged demo model (``owl3/demo_model``) goes by its model name."""
    from owl3.demo import DEMO_NAME, packaged_model_dir

    return DEMO_NAME if model_dir.resolve() == packaged_model_dir() else model_dir.resolve().name


def cmd_export(args: argparse.Namespace) -> int:
    """(quantize ->) export -> validate: each stage's directory, then one drift report beside them."""
    from owl3.export.pipeline import export_model

    model_dir = resolve_model_dir(args.pipeline_model)
    output = args.output or Path("exports") / f"{model_name(model_dir)}-{args.precision}"
    started = time.perf_counter()
    validate = not args.no_validate
    checkpoint, rejected = None, []
    source, precision = model_dir, args.precision
    if args.precision not in ("fp32", "fp16"):
        from owl3.quantize import CalibrationConfig, quantize_model, recipe

        checkpoint = output.with_name(f"{output.name}-gptq")
        _note(f"quantizing ({args.precision}, built-in calibration) -> {checkpoint}")
        quantize_model(model_dir, checkpoint, recipe(args.precision), CalibrationConfig(), force=args.force,
                       progress=_note)  # fmt: skip
        source, precision = checkpoint, None  # a quantized checkpoint exports its own precision
    targets = ("ort", "tensorrt") if args.target == "both" else (args.target,)
    exports = [output if t == "ort" else output.with_name(f"{output.name}-trt") for t in targets]
    for target, directory in zip(targets, exports, strict=True):
        _note(f"exporting the {target} flavour -> {directory}")
        try:
            export_model(source, directory, precision, target=target, force=args.force, validate=validate,
                         progress=_note)  # fmt: skip
        except GateFailure as exc:  # kept and marked rejected; the drift report still shows it
            _note(f"error: {exc.one_line()}")
            rejected.append(exc)
    if validate:
        from owl3.validate.run import validate_export

        report = output.with_name(f"{output.name}-report")
        _note(f"drift report: PyTorch fp32 vs {', '.join(str(e) for e in exports)} -> {report}")
        validate_export(
            model_dir, exports, args.precision, report, checkpoint=checkpoint, benchmark_specs=args.benchmark,
            synthetic=args.pipeline_model is None, limit=args.limit, force=args.force, progress=_note,
        )  # fmt: skip
        _note(f"report: {report / 'index.md'}")
    if rejected:
        raise rejected[0]
    _note(f"done in {time.perf_counter() - started:.1f} s; try: owl3-export run --export {exports[0]}")
    print("\n".join(str(e) for e in exports))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from owl3.model.weights import count_parameters, load_model

    model_dir = resolve_model_dir(args.model)
    model = load_model(model_dir, dtype=_torch_dtype(args.dtype))
    config = model.config
    text, vision = config.text, config.vision
    print(f"model          {model_dir}")
    print(f"parameters     {count_parameters(config):,} (checked strictly, all finite)")
    print(f"language       {text.num_hidden_layers} layers, hidden {text.hidden_size}, heads {text.num_attention_heads}"
          f"/{text.num_key_value_heads} kv, vocab {text.vocab_size}")  # fmt: skip
    print(f"hyper layers   {list(config.hyper_layers)} (0-based)")
    print(f"vision         SigLIP {vision.layers_run}/{vision.num_hidden_layers} layers run, "
          f"{vision.image_size}px, {config.image_tokens} tokens per image")  # fmt: skip
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from owl3.model.weights import load_model
    from owl3.processor import Owl3Processor
    from owl3.runtime.sampling import stream_text

    model_dir = resolve_model_dir(args.model)
    processor = Owl3Processor.from_pretrained(model_dir)
    images, videos, prompt = gather_media(args)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    inputs = processor(messages, images=images or None, videos=videos or None, cut_enable=not args.no_cut)
    model = load_model(model_dir, dtype=_torch_dtype(args.dtype))
    model.image_token_id = processor.image_token_id
    pixels = inputs["pixel_values"]
    _note(
        f"prompt: {inputs['input_ids'].shape[1]} tokens, "
        f"{0 if pixels is None else pixels.shape[0]} images/crops/frames of {model.config.image_tokens} visual tokens"
    )
    started = time.perf_counter()
    tokens = model.stream_generate(
        inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        media_offset=inputs["media_offset"],
        eos_token_id=list(processor.eos_token_ids),
        **decoding_options(args),
    )
    generated: list[int] = []

    def counted() -> Iterator[int]:
        for step in tokens:
            generated.append(int(step[0]))
            yield generated[-1]

    for piece in stream_text(processor.decode, counted(), set(processor.eos_token_ids)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    seconds = time.perf_counter() - started
    _note(f"{len(generated)} tokens in {seconds:.2f} s ({len(generated) / max(seconds, 1e-9):.1f} tokens/s)")
    return 0


def gather_media(args: argparse.Namespace) -> tuple[list, list, str]:
    """Images or video frames from the flags, and the prompt with placeholders for them."""
    from owl3.media import load_video_frames

    images: list = list(args.image)
    videos: list = []
    prompt = args.prompt
    if args.video is not None:
        sampling = "middle" if args.frames else "readme"
        videos = [load_video_frames(args.video, sampling=sampling, num_frames=args.frames)]
        if prompt is not None and "<|video|>" not in prompt:
            prompt = "<|video|>\n" + prompt
    elif not images and prompt is None:
        from owl3.demo import demo_image

        _note("no --image or --prompt given: asking about the built-in demo picture")
        images = [demo_image()]
    if prompt is None:
        prompt = ("<|video|>\n" if videos else "") + "Describe this image."
    if images and "<|image|>" not in prompt:
        prompt = "<|image|>" * len(images) + "\n" + prompt
    return images, videos, prompt


def _note(message: str) -> None:
    print(f"owl3-export: {message}", file=sys.stderr)


COMMANDS = {
    "build-engine": cmd_build_engine,
    "check-trt": cmd_check_trt,
    "export": cmd_export_stage,
    "generate": cmd_generate,
    "info": cmd_info,
    "quantize": cmd_quantize,
    "run": cmd_run,
    "validate": cmd_validate,
}


# Packages of the export, quantize and validate stages: a runtime-only install (pip install owl3-export[cpu])
# lacks them, and only `run` works there.
STAGE_PACKAGES = frozenset({"torch", "safetensors", "onnx", "onnxscript", "onnx_ir", "ml_dtypes"})


def missing_stage_dependency(exc: ModuleNotFoundError, command: str | None) -> EnvironmentProblem | None:
    """The error for a stage command run where only the runtime is installed (None: another missing module)."""
    missing = (exc.name or "").split(".")[0]
    if missing not in STAGE_PACKAGES:
        return None
    return EnvironmentProblem(
        f"'{command or '--precision'}' needs {missing}, which this runtime-only install lacks",
        where="owl3-export",
        fix="pip install 'owl3-export[export,cpu]' (only 'owl3-export run' works with the runtime alone)",
    )


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a job scheduler, ``kill``, a container stop) unwinds like Ctrl-C, so every stage removes its
    staging directory and nothing half-written is left beside the outputs; exit 130."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage and 0 on --help
        return int(exc.code or 0)
    if args.command is None and args.precision is None:
        parser.print_help()
        return 2
    try:
        with terminate_as_interrupt():
            return COMMANDS[args.command](args) if args.command else cmd_export(args)
    except Owl3Error as exc:
        if args.debug:
            raise
        print(f"owl3-export: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        problem = missing_stage_dependency(exc, args.command)
        if problem is None or args.debug:
            raise
        print(f"owl3-export: error: {problem.one_line()}", file=sys.stderr)
        return problem.exit_code
    except KeyboardInterrupt:
        print("owl3-export: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        print("owl3-export: error: out of memory: use a smaller --dtype or fewer images", file=sys.stderr)
        return 5
    except Exception as exc:  # a bug: one line, the traceback behind --debug
        if args.debug:
            raise
        print(
            f"owl3-export: error: internal error {type(exc).__name__}: {exc} (command {args.command}): "
            "rerun with --debug and report the traceback",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
