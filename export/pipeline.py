"""``export_model``: checkpoint -> a verified ONNX export directory (a stage artifact with a manifest).

Steps: strict checks of the checkpoint (config, tensor table, tokenizer) before any heavy work, a disk
preflight, the three graphs streamed into a staging directory, the tokenizer and config beside them,
validation against PyTorch, then ``manifest.json`` last and an atomic rename. A failed accuracy gate
keeps the artifact, marks it ``"status": "rejected"`` and raises GateFailure (exit 6).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from owl3.artifacts import check_free_disk, source_record, staged_output, tool_versions, write_manifest
from owl3.config import Owl3Config
from owl3.errors import GateFailure, ResourceError, UsageError
from owl3.export.onnx_export import TORCH_DTYPES, CheckpointReader, export_graph
from owl3.export.specs import (
    ACCURACY_LEVEL,
    ATTENTION_KERNELS,
    FLAVOURS,
    GRAPH_NAMES,
    PRECISIONS,
    SCHEMA,
    SCHEMA_VERSION,
)
from owl3.model.safetensors_files import discover_checkpoint
from owl3.model.weights import (
    available_ram_bytes,
    check_against_table,
    count_parameters,
    read_eos_token_ids,
    read_quantization,
)
from owl3.tokenizer import load_tokenizer, token_id

SIDE_FILES = (
    "config.json",
    "quantize_config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_ITEMSIZE = {"fp32": 4, "fp16": 2}

Progress = Callable[[str], None]


def export_model(
    model_dir: str | Path,
    output_dir: str | Path,
    precision: str | None = None,
    *,
    target: str = "ort",
    accuracy_level: int = ACCURACY_LEVEL,
    fused: bool | None = None,
    attention: str = "grouped",
    force: bool = False,
    validate: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Export ``model_dir`` (a Hugging Face checkpoint directory) to ``output_dir``; returns ``output_dir``.

    A float checkpoint exports at ``precision`` (fp32 | fp16; default fp32). A GPTQ checkpoint written by
    ``owl3-export quantize`` (or GPTQ-format elsewhere) exports its own precision (int4 | int8 | w8a8) in the
    ``target`` flavour: ``ort`` (MatMulNBits, fp32 compute, ``accuracy_level``) or ``tensorrt`` (Q/DQ, fp16).
    Float exports take the flavour too. The ort flavour uses ONNX Runtime's fused operators with the in-place
    KV cache (``owl3.export.fused``) unless ``fused=False`` (the standard decoder, kept for comparison), its
    self-attention ``attention``: "grouped" (standard operators, fastest on CPU) or "gqa" (ONNX Runtime's
    GroupQueryAttention); the tensorrt flavour has standard operators only."""
    say = progress or (lambda _message: None)
    if target not in FLAVOURS:
        raise UsageError(f"unknown export target {target!r}", where="--target", fix=f"use one of {FLAVOURS}")
    if fused and target != "ort":
        raise UsageError(
            "ONNX Runtime's fused operators exist only in the ort flavour",
            where="--target",
            fix="export --target ort, or drop the fused option for tensorrt",
        )
    fused = target == "ort" if fused is None else fused
    if attention not in ATTENTION_KERNELS:
        raise UsageError(f"self-attention kernel {attention!r} is unknown", where="--attention",
                         fix=f"use one of {ATTENTION_KERNELS}")  # fmt: skip
    if attention != "grouped" and not fused:
        raise UsageError(f"self-attention kernel {attention!r} needs the fused ort flavour", where="--attention",
                         fix="export with --target ort, without --unfused")  # fmt: skip
    model_dir, output = Path(model_dir), Path(output_dir)
    config = Owl3Config.from_hf_json(model_dir)
    files = discover_checkpoint(model_dir)
    found = {n: (i.shape, i.dtype) for n, i in files.tensors.items()}
    quantization = read_quantization(model_dir)
    rewrite, quantized = None, None
    if quantization is None:
        precision = precision or "fp32"
        if precision not in PRECISIONS:
            raise UsageError(
                f"precision {precision!r} needs a quantized checkpoint",
                where="--precision",
                fix=f"export {PRECISIONS} from float weights, or quantize first (owl3-export quantize) and export that",
            )
        check_against_table(config, found, str(model_dir))
        compute = precision
        weight_bytes = count_parameters(config) * _ITEMSIZE[precision]
    else:
        from owl3.export.quantized import Flavour, PackedReader, QuantizedRewrite
        from owl3.quantize.loading import QuantizedLayout, checkpoint_identity

        layout = QuantizedLayout.check(config, quantization, found, str(model_dir))
        stored, variant, calibration = checkpoint_identity(model_dir, quantization)
        if precision not in (None, stored):
            raise UsageError(
                f"{model_dir} is a {stored} checkpoint; it cannot be exported as {precision}",
                where="--precision",
                fix=f"omit --precision (a quantized checkpoint exports its own) or pass {stored}",
            )
        precision, flavour = stored, Flavour(target, accuracy_level)
        compute = flavour.compute
        rewrite = QuantizedRewrite(PackedReader(files, layout), flavour)
        weight_bytes = layout.model_bytes(TORCH_DTYPES[compute])
        quantized = {"precision": stored, "variant": variant, "calibration": calibration, **flavour.to_json()}
    tokenizer = load_tokenizer(model_dir)
    check_free_disk(output, int(weight_bytes * 1.1) + (64 << 20))
    if validate:
        _check_validation_memory(weight_bytes)
    reader = CheckpointReader(files)
    with staged_output(output, force=force) as staging:
        graphs = {}
        for name in GRAPH_NAMES:
            started = time.perf_counter()
            say(f"exporting the {name} graph ({precision}, {target} flavour{', fused' if fused else ''})")
            graphs[name] = export_graph(
                name, config, compute, reader, staging, rewrite, fused=fused, attention=attention
            )
            say(f"exported {name}.onnx in {time.perf_counter() - started:.1f} s")
        readiness = _tensorrt_readiness(staging, target, say)
        for side in SIDE_FILES:
            if (model_dir / side).is_file():
                shutil.copyfile(model_dir / side, staging / side)
        validation = _validate(staging, model_dir, compute, quantized, target, say) if validate else None
        manifest = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "status": "rejected" if validation and not validation["passed"] else "ok",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "precision": precision,
            "compute": compute,
            "flavour": target,
            "fused": fused,
            "quantization": quantized,
            "opset": max(g["opset"] for g in graphs.values()),
            "ir_version": max(g["ir_version"] for g in graphs.values()),
            "config": config.to_hf_dict(),
            "graphs": graphs,
            "tokens": {
                "image_token_id": token_id(tokenizer, "<|image|>"),
                "eos_token_ids": list(read_eos_token_ids(model_dir, config)),
                "pad_token_id": 0,
            },
            "source": source_record(model_dir),
            "tools": tool_versions(),
            "validation": validation,
            "tensorrt_readiness": readiness,
        }
        write_manifest(staging, manifest)
    if validation and not validation["passed"]:
        raise GateFailure(
            f"{len(validation['failures'])} accuracy checks failed: " + "; ".join(validation["failures"][:5]),
            where=str(output / "manifest.json"),
            fix="the export is kept and marked rejected; inspect the validation section of its manifest",
        )
    say(f"wrote {output}")
    return output


def _tensorrt_readiness(staging: Path, flavour: str, say: Progress) -> dict[str, Any] | None:
    """What the TensorRT 10.3 and 11.1 parsers would reject (``owl3.export.trt_check``): the TensorRT flavour
    must pass for 10.3 (anything it finds is a bug here); ORT's flavour is not for TensorRT."""
    if flavour == "ort":
        return None
    from owl3.export.onnx_export import ExportError
    from owl3.export.trt_check import check_export, format_report

    report = check_export(staging, ("10.3", "11.1"))
    say("TensorRT readiness: " + ", ".join(f"{v} {'ready' if r['ready'] else 'NOT ready'}" for v, r in report.items()))
    if flavour == "tensorrt" and not report["10.3"]["ready"]:
        raise ExportError(
            "the TensorRT-flavour graphs fail the TensorRT 10.3 readiness check:\n" + format_report(report),
            where=str(staging),
            fix="report this bug",
        )
    return report


def _check_validation_memory(weight_bytes: int) -> None:
    """Validation holds the PyTorch reference and the ONNX Runtime sessions at once: about twice the weights."""
    needed, available = 2 * weight_bytes + (512 << 20), available_ram_bytes()
    if available is not None and needed > available:
        raise ResourceError(
            f"validating needs about {needed / 2**30:.1f} GiB of RAM, {available / 2**30:.1f} GiB available",
            where="export preflight",
            fix="export with --no-validate here and validate on a larger machine",
        )


def _validate(
    staging: Path, model_dir: Path, compute: str, quantized: dict | None, flavour: str, say: Progress
) -> dict[str, Any]:
    from owl3.export.verify import verify_export

    started = time.perf_counter()
    say("validating every graph against the PyTorch reference" + (" on the same checkpoint" if quantized else ""))
    result = verify_export(staging, model_dir, compute, quantized, flavour)
    verdict = "passed" if result["passed"] else f"FAILED ({len(result['failures'])} checks)"
    say(f"validation {verdict} in {time.perf_counter() - started:.1f} s")
    return result
