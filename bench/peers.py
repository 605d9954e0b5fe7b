"""Our runtime beside ONNX Runtime GenAI and llama.cpp on the same weights, same machine, same run.

    python bench/peers.py --threads 2                      # random 1B-class model: fp32, int8, int4
    python bench/peers.py --preset demo --turns 1 --new-tokens 8 --workdir /tmp/peers-smoke   # smoke run
    python bench/peers.py --llama-python /opt/llama/bin/python     # llama.cpp too (llama-cpp-python + gguf there)
    python bench/peers.py --attention grouped gqa                  # ours with each self-attention kernel

Weights, all under --workdir (artifacts with their manifest or marker file are reused; delete them to rebuild): a
random bf16 owl3 checkpoint of --preset and, from the same tensors, a Hugging Face Qwen2ForCausalLM folder
(``language_model.`` dropped from the names; the hyper layers' v_kv_proj and gate_proj left out, since with no image
our decoder is exactly Qwen2; a tied lm_head written out untied). Ours: round-to-nearest quantization with
bench/quantized_runtime.py's recipes (speed does not depend on GPTQ vs RTN), lm_head fp16 (our default) or int8,
the default ONNX Runtime flavour at accuracy level 4. ONNX Runtime GenAI: its model builder, int8 and int4 as
MatMulNBits (block 32, accuracy level 4) with lm_head fp32, int8 or (int4) int4; it is installed from PyPI into a
venv of its own (--genai-python, or made once in the workdir) that borrows torch, transformers and onnx-ir for the
builder from this venv through a .pth placed after its own packages, so that its own onnxruntime wins. llama.cpp,
only with --llama-python (a python where ``llama_cpp`` and ``gguf`` import): an F32 GGUF written with gguf-py from
the same folder, then llama_model_quantize to Q8_0 and Q4_0 (output tensor at llama.cpp's default type, and Q4_0).

Protocol (../shared/docs/performance.md): each model in its own child process (peak RSS isolated), --threads
intra-op threads, the same --prompt-tokens ids, greedy, end tokens ignored, one warm-up then --repeats runs of a
prefill and --new-tokens decode steps; medians of time to first token and of decode time per step. The children
run in --turns rounds, every model once per round (A, B, C, A, B, C, ...), so that the machine's drift (up to 20%
within an hour here) reaches every engine alike; reported: the median over the turns (peak RSS: the largest),
each turn's decode time kept in the JSON, and a model whose greedy tokens change between turns fails. "Decoder MB" is
what the engine loads for text: our decoder graph, the builder's model, the GGUF file. Ratios: ours / the best peer
at the same bit width with lm_head quantized or not as ours ("like for like"), and with any lm_head. A variant that
fails to build or run is listed with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from measure import peak_rss_kib
from quantized_runtime import QUANTIZED, Export, directory_bytes, exported, float_checkpoint, quantized_checkpoint, say

PRECISIONS = ("fp32", "int8", "int4")
BITS = {"fp32": 32, "int8": 8, "int4": 4, "F32": 32, "Q8_0": 8, "Q4_0": 4}
GENAI_REQUIREMENT = "onnxruntime-genai"
GENAI_OPTIONS = ("accuracy_level=4", "block_size=32")  # as the peer table in performance.md
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2}  # llama_ftype LLAMA_FTYPE_MOSTLY_*
GGML_Q4_0 = 2  # ggml_type of a Q4_0 tensor (output_tensor_type)
GGUF_HPARAMS = {  # config.json key -> GGUFWriter method
    "max_position_embeddings": "add_context_length", "hidden_size": "add_embedding_length",
    "intermediate_size": "add_feed_forward_length", "num_hidden_layers": "add_block_count",
    "num_attention_heads": "add_head_count", "num_key_value_heads": "add_head_count_kv",
    "rope_theta": "add_rope_freq_base", "rms_norm_eps": "add_layer_norm_rms_eps",
}  # fmt: skip
MARKER = "peer.json"  # written last into a peer's build folder
ENGINE_NAMES = {"ours": "owl3.runtime", "genai": "ONNX Runtime GenAI", "llama": "llama.cpp"}


@dataclass(frozen=True)
class Variant:
    """One model to time: an engine, a weight format (our precision, the builder's, a GGUF type) and lm_head's."""

    engine: str  # ours | genai | llama
    format: str  # fp32 | int8 | int4 | F32 | Q8_0 | Q4_0
    lm_head: str  # what lm_head is stored as: float, int8, int4, Q8_0, Q4_0 (llama.cpp: its default, read back)
    attention: str = "grouped"  # ours: the self-attention kernel of the export (export --attention)

    @property
    def bits(self) -> int:
        return BITS[self.format]

    @property
    def name(self) -> str:
        kernel = "" if self.attention == "grouped" else f"-{self.attention}"
        return f"{self.engine}-{self.format}-lm_head-{self.lm_head}{kernel}"


# lm_head "float": ours keeps it in fp16 (the quantized checkpoints' float tensors), the builder in fp32;
# llama.cpp "default": the output tensor type llama_model_quantize picks for the file type (read back after).
PLAN = {
    "fp32": (Variant("ours", "fp32", "float"), Variant("genai", "fp32", "float"), Variant("llama", "F32", "float")),
    "int8": (
        *(Variant(engine, "int8", lm_head) for engine in ("ours", "genai") for lm_head in ("float", "int8")),
        Variant("llama", "Q8_0", "default"),
    ),
    "int4": (
        *(Variant(engine, "int4", lm_head) for engine in ("ours", "genai") for lm_head in ("float", "int8", "int4")),
        Variant("llama", "Q4_0", "default"), Variant("llama", "Q4_0", "Q4_0"),
    ),
}  # fmt: skip


def plan(
    precisions: Sequence[str],
    engines: Sequence[str],
    ours_lm_head: Sequence[str] = ("float", "int8", "int4"),
    attention: Sequence[str] = ("grouped",),
) -> list[Variant]:
    """Every variant the options ask for, ours first in each precision (ours quantized with ``ours_lm_head``,
    once per self-attention kernel in ``attention``)."""
    chosen = [v for p in PRECISIONS if p in precisions for v in PLAN[p] if v.engine in engines]
    chosen = [v for v in chosen if v.engine != "ours" or v.format == "fp32" or v.lm_head in ours_lm_head]
    variants: list[Variant] = []
    for v in chosen:
        variants += [replace(v, attention=kernel) for kernel in attention] if v.engine == "ours" else [v]
    return variants


# ---- the same weights as a Hugging Face Qwen2 folder -----------------------------------------------------------


def hf_name(owl3_name: str, hyper_extra: bool = False) -> str | None:
    """The Qwen2ForCausalLM name of an owl3 tensor, or None for one that a Qwen2 lacks (vision, projector, the hyper
    layers' v_kv_proj and gate_proj.0: ``hyper_extra`` is whether the name is one of those)."""
    if hyper_extra or not owl3_name.startswith("language_model."):
        return None
    return owl3_name.removeprefix("language_model.")


def hf_config(config: Any) -> dict[str, Any]:
    """config.json of a Qwen2ForCausalLM with the text sizes of an ``Owl3Config`` and a separate lm_head."""
    text = config.text
    eos = text.eos_token_id
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_theta, "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers, "use_sliding_window": False, "sliding_window": None,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": False,
        "bos_token_id": text.bos_token_id, "eos_token_id": eos[0] if isinstance(eos, list) else eos,
        "torch_dtype": "bfloat16",
    }  # fmt: skip


def write_hf_folder(checkpoint: Path, out: Path) -> Path:
    """The owl3 checkpoint's language model as a Qwen2ForCausalLM folder (once; reused when its marker exists)."""
    if (out / MARKER).is_file():
        return out
    from safetensors import safe_open
    from safetensors.torch import save_file

    from owl3.config import Owl3Config
    from owl3.model.safetensors_files import discover_checkpoint
    from owl3.model.weights import HYPER_EXTRA, LM_HEAD_NAME, table_entries

    config = Owl3Config.from_hf_json(checkpoint)
    extra = tuple(suffix for suffix, _shape, _kind in HYPER_EXTRA)
    files = discover_checkpoint(checkpoint).tensors
    tensors = {}
    for entry in table_entries(config, "required"):
        name = hf_name(entry.name, entry.name.endswith(extra))
        if name is not None:
            with safe_open(str(files[entry.name].file), "pt") as f:
                tensors[name] = f.get_tensor(entry.name)
    lm_head = hf_name(LM_HEAD_NAME)
    if lm_head not in tensors:  # tied in the owl3 config: the peers get the same matrix as a separate lm_head
        tensors[lm_head] = tensors["model.embed_tokens.weight"].clone()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / "model.safetensors"), {"format": "pt"})
    (staging / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    for side in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoint / side).is_file():
            shutil.copyfile(checkpoint / side, staging / side)
    (staging / MARKER).write_text(json.dumps({"source": str(checkpoint), "tensors": len(tensors)}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def prompt_ids(model_dir: Path, vocab_size: int, count: int) -> list[int]:
    """``count`` plain-text token ids (no chat template: every engine gets exactly these), all < ``vocab_size``."""
    from owl3.tokenizer import load_tokenizer

    text = "describe the small red circle left of the blue square and count the shapes please " * count
    ids = [i for i in load_tokenizer(model_dir).encode(text, add_special_tokens=False).ids if i < vocab_size]
    return ids[:count]


# ---- building each engine's model -----------------------------------------------------------------------------


def build_ours(variant: Variant, preset: str, model_dir: Path, workdir: Path, samples: int) -> Path:
    """Our export of the variant (float, or RTN-quantized with lm_head float, int8 or int4), ORT flavour, level 4."""
    flavour, level = (None, None) if variant.format == "fp32" else ("ort", 4)
    export = Export(variant.format, flavour, level, variant.attention)
    if variant.format == "fp32":
        return exported(model_dir, workdir / f"{preset}-{export.dirname}", export)
    if variant.lm_head == "float":  # the directories bench/quantized_runtime.py uses too
        source = quantized_checkpoint(model_dir, workdir / f"{preset}-{variant.format}-rtn", variant.format, samples)
        return exported(source, workdir / f"{preset}-{export.dirname}", export)
    from owl3.quantize import CalibrationConfig, quantize_model, recipe

    source = workdir / f"{preset}-{variant.format}-rtn-lm_head-{variant.lm_head}"
    if not (source / "manifest.json").is_file():
        name, overrides = QUANTIZED[variant.format]
        say(f"quantizing {variant.format} (recipe {name}, lm_head {variant.lm_head})")
        chosen = recipe(name, **overrides, lm_head=variant.lm_head)
        quantize_model(model_dir, source, chosen, CalibrationConfig(samples=samples), force=True)
    return exported(source, workdir / f"{preset}-lm_head-{variant.lm_head}-{export.dirname}", export)


def genai_python(workdir: Path, given: Path | None) -> Path:
    """The python of a venv with onnxruntime-genai: ``given``, or one made once in the workdir from PyPI."""
    if given is not None:
        return given
    venv = workdir / "genai-venv"
    python = venv / "bin" / "python"
    if not (venv / MARKER).is_file():
        say(f"installing {GENAI_REQUIREMENT} into {venv} (its own onnxruntime; this venv is left alone)")
        shutil.rmtree(venv, ignore_errors=True)
        run([sys.executable, "-m", "venv", str(venv)], "making the peer venv")
        run([str(python), "-m", "pip", "install", "-q", GENAI_REQUIREMENT], f"pip install {GENAI_REQUIREMENT}")
        purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "venv")
        # after the venv's own packages on sys.path: torch, transformers, onnx-ir for the builder come from here
        Path(purelib.strip(), "zz-owl3-bench.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        (venv / MARKER).write_text(json.dumps({"requirement": GENAI_REQUIREMENT}))
    return python


def build_genai(variant: Variant, python: Path, hf_dir: Path, out: Path) -> Path:
    """The model builder's CPU decoder for the variant (lm_head at the body's width unless the variant says int8)."""
    if (out / MARKER).is_file():
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    options = [] if variant.format == "fp32" else list(GENAI_OPTIONS)
    if variant.format != "fp32" and variant.lm_head == "float":
        options.append("nodes_to_exclude=/lm_head/MatMul")
    elif variant.lm_head != variant.format and variant.format != "fp32":
        options.append(f"matmul_mixed_precision=last_matmul:{variant.lm_head}")
    command = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(staging),
               "-p", variant.format, "-e", "cpu", "-c", str(out.parent / "genai-cache")]  # fmt: skip
    say(f"building {variant.name} with the onnxruntime-genai model builder")
    run(command + (["--extra_options", *options] if options else []), f"building {variant.name}")
    (staging / MARKER).write_text(json.dumps({"command": command, "extra_options": options}))
    staging.rename(out)
    return out


def build_llama(variant: Variant, python: Path, hf_dir: Path, workdir: Path, threads: int) -> Path:
    """The GGUF file of the variant: F32 written from the HF folder, the others quantized from it."""
    f32 = workdir / "llama-F32.gguf"
    workdir.mkdir(parents=True, exist_ok=True)
    if not f32.is_file():
        say("writing the F32 GGUF")
        run([str(python), __file__, "--child-gguf", str(hf_dir), str(f32)], "writing the F32 GGUF")
    if variant.format == "F32":
        return f32
    out = workdir / f"llama-{variant.format}-output-{variant.lm_head}.gguf"
    if not out.is_file():
        say(f"quantizing {out.name}")
        command = [str(python), __file__, "--child-quantize", str(f32), str(out), variant.format, variant.lm_head]
        run([*command, str(threads)], f"quantizing {out.name}")
    return out


# ---- in the child processes -----------------------------------------------------------------------------------


def timed_runs(stream: Callable[[list[int], int], Iterator[int]], ids: list[int], steps: int, repeats: int) -> dict:
    """One warm-up and ``repeats`` runs of prefill plus ``steps`` decode steps: medians (seconds) and peak RSS."""
    runs = []
    for _ in range(repeats + 1):
        tokens, started = [], time.perf_counter()
        for token in stream(ids, steps + 1):
            tokens.append(int(token))
            if len(tokens) == 1:
                first = time.perf_counter()
        ended = time.perf_counter()
        if len(tokens) != steps + 1:
            raise SystemExit(f"expected {steps + 1} tokens, the engine gave {len(tokens)}")
        runs.append((first - started, (ended - first) / steps))
    return {
        "prompt_tokens": len(ids), "decode_steps": steps, "tokens": tokens,
        "ttft_s": statistics.median(r[0] for r in runs[1:]),
        "decode_s_per_token": statistics.median(r[1] for r in runs[1:]),
        "peak_rss_gib": peak_rss_kib() / 2**20,
    }  # fmt: skip


def ours_stream(export_dir: Path, threads: int) -> Callable[[list[int], int], Iterator[int]]:
    from owl3.runtime import Owl3Session

    session = Owl3Session(export_dir, "cpu", verify="size", intra_op_threads=threads)

    def stream(ids: list[int], count: int) -> Iterator[int]:
        for token in session.stream_ids(np.array([ids], dtype=np.int64), max_new_tokens=count, eos_token_ids=[]):
            yield int(token[0])

    return stream


def genai_stream(model_dir: Path, threads: int) -> Callable[[list[int], int], Iterator[int]]:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def stream(ids: list[int], count: int) -> Iterator[int]:
        params = og.GeneratorParams(model)
        length = len(ids) + count  # min_length = max_length: the end token cannot stop it early
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    return stream


def llama_stream(gguf_file: Path, threads: int, context: int) -> Callable[[list[int], int], Iterator[int]]:
    from llama_cpp import Llama

    llm = Llama(str(gguf_file), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)

    def stream(ids: list[int], count: int) -> Iterator[int]:
        llm.reset()  # no prefix reuse from the previous run: every run prefills the whole prompt
        for made, token in enumerate(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), 1):
            yield token  # generate() never stops on the end token; it stops when we do
            if made == count:
                return

    return stream


def child(engine: str, path: Path, ids_file: Path, steps: int, repeats: int, threads: int) -> None:
    ids = json.loads(ids_file.read_text())
    if engine == "ours":
        stream = ours_stream(path, threads)
    elif engine == "genai":
        stream = genai_stream(path, threads)
    else:
        stream = llama_stream(path, threads, context=len(ids) + steps + 16)
    result = timed_runs(stream, ids, steps, repeats)
    result["engine_version"] = engine_version(engine)
    print("RESULT " + json.dumps(result))


def engine_version(engine: str) -> str:
    from importlib.metadata import version

    package = {"ours": "onnxruntime", "genai": "onnxruntime-genai", "llama": "llama-cpp-python"}[engine]
    runtime = f", onnxruntime {version('onnxruntime')}" if engine == "genai" else ""
    return f"{package} {version(package)}{runtime}"


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of a safetensors file, one at a time (bf16 widened exactly)."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    kinds = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = data[start:end].view(kinds[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        yield name, array.astype(np.float32)


def write_gguf_f32(hf_dir: Path, out: Path) -> None:
    """In a python with gguf-py: the HF Qwen2 folder as an F32 GGUF (names by gguf's own tensor map).
    convert_hf_to_gguf.py would refuse our demo tokenizer (unknown pre-tokenizer hash), so the vocabulary is
    written here: the BPE tokens and merges of tokenizer.json, padded to vocab_size, pre-tokenizer qwen2."""
    import gguf

    config = json.loads((hf_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out.with_suffix(".partial")), "qwen2")
    writer.add_name("owl3-bench random Qwen2")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, add in GGUF_HPARAMS.items():
        getattr(writer, add)(config[key])
    add_vocabulary(writer, json.loads((hf_dir / "tokenizer.json").read_text()), config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    weights = hf_dir / "model.safetensors"
    for name, array in read_safetensors(weights):
        writer.add_tensor_info(names.get_name(name, try_suffixes=(".weight", ".bias")), array.shape, array.dtype,
                               array.nbytes)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, array in read_safetensors(weights):
        writer.write_tensor_data(array)
    writer.close()
    out.with_suffix(".partial").rename(out)


def add_vocabulary(writer: Any, tokenizer: dict[str, Any], config: dict[str, Any]) -> None:
    import gguf

    tokens = [f"[PAD{i}]" for i in range(config["vocab_size"])]
    types = [gguf.TokenType.UNUSED] * config["vocab_size"]
    for token, index in tokenizer["model"]["vocab"].items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in tokenizer["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if config.get(key) is not None:
            add(config[key])


def quantize_gguf(f32: Path, out: Path, ftype: str, output: str, threads: int) -> None:
    """In a python with llama_cpp: llama_model_quantize to ``ftype``; the output tensor (lm_head) at ``output``:
    'default' (llama.cpp's own choice for the type) or 'Q4_0'."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.nthread = threads
    if output == "Q4_0":
        params.output_tensor_type = GGML_Q4_0
    partial = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize {f32} -> {ftype} failed")
    partial.rename(out)


def gguf_output_type(path: Path, python: Path) -> str:
    """The GGML type name of the GGUF's output tensor (lm_head), read with the llama python's gguf-py."""
    code = "import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); "
    code += "print(next(t.tensor_type.name for t in r.tensors if t.name == 'output.weight'))"
    return run([str(python), "-c", code, str(path)], f"reading {path}").strip()


# ---- measuring ------------------------------------------------------------------------------------------------


class StepFailed(RuntimeError):
    """A child command (a build, a measurement) failed; the message ends with its stderr."""


def run(command: Sequence[str], what: str) -> str:
    """A command's stdout; raises StepFailed with the end of its stderr when it fails."""
    done = subprocess.run(list(command), capture_output=True, text=True)
    if done.returncode != 0:
        raise StepFailed(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def measure(python: Path, variant: Variant, path: Path, ids_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [str(python), __file__, "--child", variant.engine, str(path), "--ids", str(ids_file)]
    command += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    lines = [line for line in run(command, f"measuring {variant.name}").splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise StepFailed(f"measuring {variant.name} printed no RESULT line")
    return json.loads(lines[-1].removeprefix("RESULT "))


def combine_turns(turns: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One model's result over its turns: medians of time to first token and decode time per step, the largest
    peak RSS, each turn's decode time; refused when the greedy tokens differ between turns."""
    if any(turn["tokens"] != turns[0]["tokens"] for turn in turns):
        raise StepFailed("the greedy tokens changed between turns")
    return {
        **turns[0], "turns": len(turns),
        "ttft_s": statistics.median(turn["ttft_s"] for turn in turns),
        "decode_s_per_token": statistics.median(turn["decode_s_per_token"] for turn in turns),
        "decode_s_per_token_turns": [turn["decode_s_per_token"] for turn in turns],
        "peak_rss_gib": max(turn["peak_rss_gib"] for turn in turns),
    }  # fmt: skip


def model_bytes(variant: Variant, path: Path) -> int:
    """Bytes of what the engine loads for text: our decoder graph and its data, the builder's folder's graphs."""
    if variant.engine == "llama":
        return path.stat().st_size
    pattern = "decoder.onnx*" if variant.engine == "ours" else "*.onnx*"
    return sum(p.stat().st_size for p in path.glob(pattern))


def export_record(directory: Path) -> dict[str, Any]:
    manifest = json.loads((directory / "manifest.json").read_text())
    keep = ("precision", "compute", "flavour", "quantization", "opset", "tools")
    return {key: manifest.get(key) for key in keep}


# ---- report ---------------------------------------------------------------------------------------------------

FLOAT_TYPES = ("fp32", "fp16", "F32", "F16", "BF16")


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row of ours: tokens/s over the best peer's at the same bit width, lm_head quantized or not as ours
    ("like for like"), and with any lm_head; None where no peer ran."""
    out = []
    for row in (r for r in rows if r["engine"] == "ours"):
        peers = [p for p in rows if p["engine"] != "ours" and p["bits"] == row["bits"]]
        same = [p for p in peers if p["lm_head_quantized"] == row["lm_head_quantized"]]
        entry = {"ours": row["label"], "bits": row["bits"], "lm_head": row["lm_head"]}
        for key, group in (("like_for_like", same), ("any_lm_head", peers)):
            best = max(group, key=lambda p: p["decode_tokens_per_s"], default=None)
            entry[key] = None if best is None else {
                "peer": best["label"], "ratio": row["decode_tokens_per_s"] / best["decode_tokens_per_s"],
                "paired": paired_ratio(row, best)}  # fmt: skip
        out.append(entry)
    return out


def paired_ratio(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any] | None:
    """Ours / the peer's tokens/s turn by turn (the two ran minutes apart in each turn, not an hour): the median
    of those ratios, their range and in how many turns ours was faster; None without turns on both sides."""
    mine, theirs = ours.get("decode_s_per_token_turns"), peer.get("decode_s_per_token_turns")
    if not mine or not theirs or len(mine) != len(theirs):
        return None
    ratios = [their / our for our, their in zip(mine, theirs, strict=True)]
    return {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
            "faster_turns": sum(r > 1 for r in ratios), "turns": len(ratios)}  # fmt: skip


def print_table(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> None:
    header = ("engine", "format", "lm_head", "decoder MB", "TTFT ms", "tok/s", "ms/token", "RSS GiB", "=fp32 tok")
    print("\n{:20} {:7} {:8} {:>10} {:>8} {:>7} {:>8} {:>7} {:>9}".format(*header))
    for r in rows:
        print(
            f"{engine_column(r):20} {r['format']:7} {r['lm_head']:8} {r['decoder_bytes'] / 1e6:10.1f} "
            f"{1000 * r['ttft_s']:8.1f} {r['decode_tokens_per_s']:7.1f} {1000 * r['decode_s_per_token']:8.1f} "
            f"{r['peak_rss_gib']:7.2f} {r['tokens_equal_to_ours_fp32']:>9}"
        )
    print()
    for c in comparisons:
        parts = []
        for key, words in (("like_for_like", "like for like"), ("any_lm_head", "any lm_head")):
            best = c[key]
            if best is None:
                parts.append(f"{words}: no peer ran")
                continue
            paired = best.get("paired")
            turns = "" if paired is None else (
                f", turn by turn {paired['median']:.2f}x [{paired['low']:.2f}-{paired['high']:.2f}], faster in "
                f"{paired['faster_turns']} of {paired['turns']}")  # fmt: skip
            parts.append(f"{words}: {best['ratio']:.2f}x {best['peer']}{turns}")
        print(f"ours {c['ours']} / best peer ({'; '.join(parts)})")


def engine_column(row: dict[str, Any]) -> str:
    kernel = row["attention"]
    return ENGINE_NAMES[row["engine"]] + ("" if kernel == "grouped" else f" ({kernel})")


def failure(what: str, exc: Exception) -> str:
    message = f"{what} failed: {type(exc).__name__}: {exc}"[:3000]
    say(message)
    return message


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items of ``a`` and ``b`` are equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def label(variant: Variant, lm_head: str) -> str:
    kernel = "" if variant.attention == "grouped" else f", {variant.attention}"
    return f"{ENGINE_NAMES[variant.engine]} {variant.format} (lm_head {lm_head}{kernel})"


def build(variant: Variant, args: argparse.Namespace, pythons: dict[str, Path], sources: dict[str, Path]) -> Path:
    if variant.engine == "ours":
        return build_ours(variant, args.preset, sources["owl3"], args.workdir, args.samples)
    if variant.engine == "genai":
        out = args.workdir / f"{args.preset}-genai-{variant.format}-lm_head-{variant.lm_head}"
        return build_genai(variant, pythons["genai"], sources["hf"], out)
    return build_llama(variant, pythons["llama"], sources["hf"], args.workdir / f"{args.preset}-llama", args.threads)


def onnx_lm_head(graph: Path) -> str:
    """How an ONNX decoder stores lm_head: int4 / int8 (MatMulNBits bits) or fp32 / fp16 (the float matrix that the
    logits' MatMul reads, through Transpose or Cast: for a tied model, the embedding table)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    producer = {output: node for node in model.graph.node for output in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    node = producer["logits"]
    while node.op_type == "Cast":
        node = producer[node.input[0]]
    if node.op_type == "MatMulNBits":
        return f"int{next(a.i for a in node.attribute if a.name == 'bits')}"
    weight = node.input[1]
    while weight not in initializers:
        weight = producer[weight].input[0]
    return {1: "fp32", 10: "fp16"}[initializers[weight].data_type]


def row_for(variant: Variant, path: Path, result: dict[str, Any], pythons: dict[str, Path]) -> dict[str, Any]:
    if variant.engine == "llama":
        lm_head = gguf_output_type(path, pythons["llama"])
    else:
        lm_head = onnx_lm_head(path / ("decoder.onnx" if variant.engine == "ours" else "model.onnx"))
    return {
        **asdict(variant), "lm_head": lm_head, "lm_head_quantized": lm_head not in FLOAT_TYPES, "bits": variant.bits,
        "label": label(variant, lm_head), "path": str(path), **result,
        "decoder_bytes": model_bytes(variant, path), "decode_tokens_per_s": 1 / result["decode_s_per_token"],
        "export": export_record(path) if variant.engine == "ours" else None,
        "directory_bytes": directory_bytes(path) if path.is_dir() else path.stat().st_size,
    }  # fmt: skip


def peer_pythons(args: argparse.Namespace) -> dict[str, Path]:
    """The python of each engine that can run; llama.cpp only when its python imports llama_cpp and gguf."""
    pythons = {"ours": Path(sys.executable)}
    if not args.skip_genai:
        pythons["genai"] = genai_python(args.workdir, args.genai_python)
    if args.llama_python is not None:
        check = subprocess.run([str(args.llama_python), "-c", "import llama_cpp, gguf"], capture_output=True, text=True)
        if check.returncode == 0:
            pythons["llama"] = args.llama_python
        else:
            say(f"llama.cpp skipped: {args.llama_python} cannot import llama_cpp and gguf:\n{check.stderr[-500:]}")
    return pythons


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b-class-unverified", help="an Owl3Config preset, or demo (smoke test)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps after the first token")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per child after one warm-up (median)")
    parser.add_argument("--turns", type=int, default=3, help="rounds of every model's child, in turns (median)")
    parser.add_argument("--samples", type=int, default=2, help="calibration samples (RTN reads only shapes)")
    parser.add_argument("--lm-head", nargs="+", default=["float", "int8", "int4"], choices=["float", "int8", "int4"],
                        help="our quantized exports' lm_head: float (fp16, our default), int8, int4")  # fmt: skip
    parser.add_argument("--attention", nargs="+", default=["grouped"], choices=["grouped", "gqa"],
                        help="our exports' self-attention kernels (export --attention), each measured")  # fmt: skip
    parser.add_argument("--skip-genai", action="store_true", help="no ONNX Runtime GenAI")
    parser.add_argument("--genai-python", type=Path, help="a python with onnxruntime-genai (default: a venv made "
                        "in the workdir)")  # fmt: skip
    parser.add_argument("--llama-python", type=Path, help="a python with llama-cpp-python and gguf (else skipped)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, default=Path("bench-results/peers.json"))
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-gguf", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-quantize", nargs=5, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.ids, args.new_tokens, args.repeats, args.threads)
    if args.child_gguf:
        return write_gguf_f32(*args.child_gguf)
    if args.child_quantize:
        f32, out, ftype, output, threads = args.child_quantize
        return quantize_gguf(Path(f32), Path(out), ftype, output, int(threads))
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="owl3-peers-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    from owl3.config import Owl3Config

    sources = {"owl3": float_checkpoint(args.preset, args.workdir)}
    sources["hf"] = write_hf_folder(sources["owl3"], args.workdir / f"{args.preset}-hf-qwen2")
    vocab = Owl3Config.from_hf_json(sources["owl3"]).text.vocab_size
    ids_file = args.workdir / "prompt-ids.json"
    ids_file.write_text(json.dumps(prompt_ids(sources["owl3"], vocab, args.prompt_tokens)))
    pythons = peer_pythons(args)
    variants = plan(args.precisions, list(pythons), args.lm_head, args.attention)
    paths, rows, failed = {}, [], {}
    for variant in variants:  # a variant that fails is reported with its error; the others still run
        try:
            paths[variant] = build(variant, args, pythons, sources)
        except Exception as exc:
            failed[variant.name] = failure(f"building {variant.name}", exc)
    turns: dict[Variant, list[dict[str, Any]]] = {variant: [] for variant in paths}
    for turn in range(1, args.turns + 1):  # in turns: a drift of the machine reaches every engine alike
        for variant, path in paths.items():
            if variant.name in failed:
                continue
            say(f"measuring {variant.name} (turn {turn} of {args.turns})")
            try:
                turns[variant].append(measure(pythons[variant.engine], variant, path, ids_file, args))
            except Exception as exc:
                failed[variant.name] = failure(f"measuring {variant.name}", exc)
    for variant, path in paths.items():
        if variant.name not in failed:
            try:
                rows.append(row_for(variant, path, combine_turns(turns[variant]), pythons))
            except StepFailed as exc:
                failed[variant.name] = failure(f"measuring {variant.name}", exc)
    reference = next((r["tokens"] for r in rows if r["engine"] == "ours" and r["format"] == "fp32"), [])
    for row in rows:  # how many leading greedy tokens equal ours at fp32: a check that the weights are the same
        row["tokens_equal_to_ours_fp32"] = common_prefix(row["tokens"], reference)
    comparisons = compare(rows)
    print_table(rows, comparisons)
    for message in failed.values():
        print(f"FAILED: {message.splitlines()[0][:300]}")
    versions = sorted({r["engine_version"] for r in rows})
    print(f"\n{args.prompt_tokens}-token prompt, {args.new_tokens} greedy decode steps (end token ignored), "
          f"{args.threads} threads, median of {args.turns} turns of {args.repeats} run(s) after a warm-up; "
          f"{'; '.join(versions)}")  # fmt: skip
    record = {
        "preset": args.preset, "threads": args.threads, "prompt_ids": json.loads(ids_file.read_text()),
        "new_tokens": args.new_tokens, "repeats": args.repeats, "turns": args.turns, "engines": sorted(pythons),
        "versions": versions, "rows": rows, "comparisons": comparisons, "failed": failed, "workdir": str(args.workdir),
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}; working files in {args.workdir}")
    return None


if __name__ == "__main__":
    main()
