"""``owl3-export run``: answer a prompt with an ONNX export on ONNX Runtime (or its TensorRT engines), without torch.

Registered by ``owl3.cli`` (``add_run_parser`` adds the sub-command, ``cmd_run`` runs it and returns the
exit code; errors propagate as typed exceptions that ``owl3.cli.main`` turns into the one-line message).
Options mirror ``owl3-export generate``; the answer streams to stdout, notes and timings go to stderr.
Importing this module imports neither torch nor onnxruntime (the session is loaded when the command runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")  # = owl3.runtime.backend's; that module imports ORT
RUN_HELP = "answer a prompt with an ONNX export on ONNX Runtime (no torch), streaming the answer"


def add_run_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``run`` sub-command to ``subparsers``; returns its parser."""
    run = subparsers.add_parser("run", help=RUN_HELP, description=RUN_HELP + ".")
    run.add_argument(
        "--export", type=Path, help="export directory written by 'owl3-export --precision ...' (with --engines: "
        "default the export the engines were built from)"
    )  # fmt: skip
    run.add_argument(
        "--engines", type=Path, help="TensorRT engine directory from 'owl3-export build-engine' (UNVERIFIED)"
    )
    run.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto", help="ONNX Runtime execution provider")
    run.add_argument("--verify", choices=("full", "size"), default="full", help="check files by sha256 or size")
    run.add_argument("--threads", type=int, default=None, help="CPU threads per graph run (default: ORT's)")
    add_prompt_options(run)
    return run


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    """The prompt, media and decoding flags shared by ``run`` (ONNX) and ``generate`` (PyTorch)."""
    parser.add_argument("--prompt", default=None, help="user message; <|image|> / <|video|> mark where media go")
    parser.add_argument("--system", default=None, help="system message (default: empty, as the official template)")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    media.add_argument("--video", type=Path, help="video file (needs PyAV) or a directory of frame images")
    parser.add_argument("--frames", type=int, default=None, help="video: sample this many frames (eval 'middle' rule)")
    parser.add_argument("--no-cut", action="store_true", help="images: one global view each, no crops")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def decoding_options(args: argparse.Namespace) -> dict[str, object]:
    """The decoding keyword arguments of ``add_prompt_options``' flags (same names in both backends)."""
    names = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
    return {name: getattr(args, name) for name in names}


def cmd_run(args: argparse.Namespace) -> int:
    """Load the export, gather the media, stream the answer to stdout and the timings to stderr."""
    from owl3.cli import gather_media  # torch-free; imported here because owl3.cli imports this module
    from owl3.runtime.session import Owl3Session

    export = run_export_dir(args)
    session = Owl3Session(
        export, args.provider, verify=args.verify, intra_op_threads=args.threads, engines=args.engines
    )
    _note(f"loaded {export} ({session.precision}) on {', '.join(session.providers)}")
    images, videos, prompt = gather_media(args)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    timings: dict[str, float] = {}
    pieces = session.stream(
        messages,
        images=images or None,
        videos=videos or None,
        cut_enable=not args.no_cut,
        timings=timings,
        **decoding_options(args),
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _note(format_timings(timings))
    return 0


def run_export_dir(args: argparse.Namespace) -> Path:
    """``--export``, or with ``--engines`` alone the export recorded in the engine manifest."""
    from owl3.errors import UsageError

    if args.export is not None:
        return args.export
    if args.engines is None:
        raise UsageError("run needs --export (or --engines)", where="run", fix="pass --export EXPORT_DIR")
    from owl3.artifacts import read_manifest
    from owl3.runtime.engine_check import ENGINE_SCHEMA

    source = read_manifest(args.engines, schema=ENGINE_SCHEMA).get("source", {}).get("path")
    if not source:
        raise UsageError(
            "the engine manifest does not name its export", where=str(args.engines), fix="pass --export EXPORT_DIR"
        )
    return Path(source)


def format_timings(timings: dict[str, float]) -> str:
    """One line: tokens, time to first token, decode speed, and where the time went."""
    tokens = int(timings.get("new_tokens", 0))
    return (
        f"{tokens} tokens in {timings.get('total_s', 0.0):.2f} s; "
        f"time to first token {timings.get('time_to_first_token_s', 0.0):.3f} s "
        f"(preprocess {timings.get('preprocess_s', 0.0):.3f}, vision {timings.get('vision_s', 0.0):.3f}, "
        f"visual memory {timings.get('visual_memory_s', 0.0):.3f}, prefill {timings.get('prefill_s', 0.0):.3f}); "
        f"decode {timings.get('decode_tokens_per_s', 0.0):.1f} tokens/s"
    )


def _note(message: str) -> None:
    print(f"owl3-export: {message}", file=sys.stderr)
