"""Owl3Session: torch-free mPLUG-Owl3 inference on an exported directory (three ONNX graphs).

A request runs the vision graph once per image (in chunks of ``VISION_CHUNK``), the visual memory graph
once (per hyper layer K/V with MI-RoPE, cached for every step, spec §6), the decoder once over the prompt,
then one decoder step per new token with the text KV cache. It mirrors ``Owl3Model.generate``: prompt
tokens see ``placement.seen`` images, every generated token sees all of its sample's images, positions
continue ``L, L+1, ...``; without images the visual inputs are zero-length and ``visible_images`` is 0.

Everything is checked before anything is allocated or run: the export (manifest, sha256 or sizes, graph
signatures, ONNX versions) when the session is created; ids, pixels, placement and the limits (images,
visual tokens, context) for every request. All per-request state is local, so concurrent ``generate``
calls on one session give the same results as sequential ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from owl3.artifacts import ArtifactError
from owl3.config import Owl3Config
from owl3.errors import PromptError
from owl3.export.specs import (
    EXPORT_PRECISIONS as PRECISIONS,
)
from owl3.export.specs import (
    float_dtype,
    graph_specs,
    past_key,
    past_value,
    present_key,
    present_value,
)
from owl3.placement import ImagePlacement, parse_media_offset
from owl3.processor import DEFAULT_MAX_IMAGES, Owl3Processor
from owl3.runtime.backend import OrtBackend, load_backend
from owl3.runtime.manifest import read_export, same_signature
from owl3.runtime.profiles import ProfileLimits
from owl3.runtime.request import Request, RequestChecker, RequestLimits
from owl3.runtime.sampling import next_tokens, stream_text

MAX_PROFILE_BATCH = 8  # samples per request the TensorRT execution provider's profiles cover
VISION_CHUNK = 8  # images per vision run: bounds the activation memory of the vision graph
PREFILL_CHUNK = 512  # prompt tokens per fused decoder run: bounds the attention scores of a long prompt
CACHE_HEADROOM = 256  # rows the fused cache holds beyond the prompt (then it doubles, to the request's limit)


@dataclass(frozen=True)
class GenerationResult:
    """One answer. ``token_ids``: the new tokens, the end token included (as ``generate_ids``);
    ``finish_reason``: "stop" (an end token) or "length" (``max_new_tokens``). ``timings`` (seconds):
    preprocess_s, vision_s, visual_memory_s, prefill_s, time_to_first_token_s (from the call),
    decode_s (decoder steps and sampling after the first token), decode_tokens_per_s, new_tokens, total_s.
    ``providers``: what computed it (ONNX Runtime's active execution providers, or the TensorRT engines)."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)
    providers: tuple[str, ...] = ()  # what computed it: ONNX Runtime's active providers, or TensorRT


@dataclass
class InPlaceCache:
    """One request's KV cache for the fused decoder: per layer a K and a V buffer [B, nkv, capacity, hd] that
    the graph updates in place (``buffers``: past input name -> (present output name, buffer)); ``length``: the
    rows filled; ``limit``: the rows the request may reach (prompt + ``max_new_tokens``).

    The buffers grow (``reserve``) instead of being allocated for the limit at once, because the grouped
    self-attention reads every row of its buffer (the unfilled ones at probability 0): a short answer under a
    large ``max_new_tokens`` would pay at every step for rows it never fills (README: a 32-token int4 chat stepped
    at 36 ms under ``max_new_tokens`` 64 and at 52 ms under 4,096). The prompt gets its rows plus
    ``CACHE_HEADROOM``, then the capacity doubles, so a step reads at most about twice the rows it needs and the
    filled rows are copied a few times per request (log2 of its length), not at every step."""

    allocate: Callable[[np.ndarray], Any]  # a host array -> a device buffer holding its values
    names: tuple[tuple[str, str], ...]  # (past input, present output) per buffer
    shape: tuple[int, int, int]  # batch, KV heads, head dim
    dtype: np.dtype
    limit: int
    buffers: dict[str, tuple[str, Any]] = field(default_factory=dict)
    capacity: int = 0
    length: int = 0
    binding: Any = None  # the decoder's IO binding of these buffers (OrtGraph.bind), made again when they grow

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows: new zero-filled buffers (finite beyond the filled rows, which meet probability
        0) holding the filled rows, when the current ones are too small."""
        if rows <= self.capacity:
            return
        capacity = max(rows, min(self.limit, max(rows + CACHE_HEADROOM, 2 * self.capacity)))
        batch, heads, head_dim = self.shape
        for past, present in self.names:
            values = np.zeros((batch, heads, capacity, head_dim), self.dtype)
            if self.length:
                values[:, :, : self.length] = self.buffers[past][1].numpy()[:, :, : self.length]
            self.buffers[past] = (present, self.allocate(values))
        self.capacity, self.binding = capacity, None

    def arrays(self) -> dict[str, np.ndarray]:
        """The filled rows by present output name, as numpy copies."""
        return {present: buffer.numpy()[:, :, : self.length] for present, buffer in self.buffers.values()}


class Owl3Session:
    """An exported mPLUG-Owl3 on ONNX Runtime. See the module docstring; limits are per request."""

    def __init__(
        self,
        export_dir: str | Path,
        provider: str = "auto",
        *,
        verify: str = "full",
        max_images: int = DEFAULT_MAX_IMAGES,
        max_visual_tokens: int | None = None,
        max_context: int | None = None,
        intra_op_threads: int | None = None,
        allow_rejected: bool = False,
        engines: str | Path | None = None,
    ) -> None:
        """``engines``: a directory ``owl3-export build-engine`` made from this export: the graphs then run on
        those TensorRT engines (UNVERIFIED, see owl3.runtime.tensorrt_backend) instead of ONNX Runtime."""
        from dataclasses import replace

        from owl3.runtime.tensorrt_backend import TrtBackend, load_engine_backend  # imports no TensorRT

        self.export_dir = Path(export_dir)
        self.manifest = read_export(self.export_dir, verify, allow_rejected=allow_rejected)
        self.config = Owl3Config.from_hf_json(self.manifest["config"])
        self.precision: str = self.manifest["precision"]
        limits = RequestLimits.for_config(self.config, max_images, max_visual_tokens, max_context)
        self._check_graph_specs()
        self.processor = Owl3Processor.from_pretrained(self.export_dir, max_images=max_images)
        self.requests = self._request_checker(limits)
        self.backend: OrtBackend | TrtBackend
        if engines is None:
            profile = ProfileLimits(MAX_PROFILE_BATCH, limits.max_images, limits.max_visual_tokens, limits.max_context)
            self.backend = load_backend(
                self.export_dir, self.manifest, provider, intra_op_threads=intra_op_threads, profile_limits=profile
            )
        else:  # the engines' profiles bound the requests: beyond them a request is refused before it runs
            self.backend = load_engine_backend(engines, self.manifest, self.export_dir, provider, verify=verify)
            self.requests = replace(self.requests, limits=self.backend.cover(limits))
        for name, spec in self._specs.items():
            self.backend.graphs[name].check_signature(
                [t.name for t in spec.inputs], [t.name for t in spec.outputs], str(self.export_dir / spec.file)
            )

    # ---- loading ----------------------------------------------------------------------------------
    def _check_graph_specs(self) -> None:
        self.compute: str = self.manifest.get("compute") or self.precision  # the graphs' float dtype
        self.flavour: str | None = self.manifest.get("flavour")
        if self.precision not in PRECISIONS or self.compute not in ("fp32", "fp16"):
            raise ArtifactError(
                f"unknown precision {self.precision!r} / compute {self.compute!r}",
                where=str(self.export_dir / "manifest.json"),
                fix="export again with this version of owl3-export",
            )
        self.fused: bool = bool(self.manifest.get("fused"))  # ONNX Runtime's fused decoder, in-place cache
        fusions = self.manifest["graphs"].get("decoder", {}).get("fusions") or {}
        # GroupQueryAttention refuses a batch of several samples continuing a filled cache with more than one
        # token ("batch_size must be 1 when sequence_length > 1 and past context is given"): such a prompt
        # is prefilled in one run.
        self._chunks_batches = fusions.get("self_attention") != "gqa"
        self._specs = graph_specs(self.config, self.compute, self.fused)
        self._float = np.dtype(float_dtype(self.compute))
        graphs = self.manifest.get("graphs", {})
        wrong = [name for name, spec in self._specs.items() if not same_signature(graphs.get(name), spec.signature())]
        if wrong or set(graphs) != set(self._specs):
            raise ArtifactError(
                f"graphs {wrong or sorted(graphs)} differ from what this runtime expects for the config",
                where=str(self.export_dir / "manifest.json"),
                fix="export again with this version of owl3-export",
            )
        layers = range(self.config.text.num_hidden_layers)
        self._present_names = [n for i in layers for n in (present_key(i), present_value(i))]
        self._visual_names = [t.name for t in self._specs["visual_memory"].outputs]
        # (decoder input, the output that feeds it at the next step)
        self._past_pairs = [
            p for i in layers for p in ((past_key(i), present_key(i)), (past_value(i), present_value(i)))
        ]

    def _request_checker(self, limits: RequestLimits) -> RequestChecker:
        """Token ids from the manifest (checked against the tokenizer) and the request limits."""
        tokens = self.manifest.get("tokens", {})
        image_token_id = int(tokens.get("image_token_id", self.processor.image_token_id))
        if image_token_id != self.processor.image_token_id:
            raise ArtifactError(
                f"manifest image_token_id {image_token_id} differs from the tokenizer's "
                f"{self.processor.image_token_id}",
                where=str(self.export_dir / "manifest.json"),
                fix="export again: the tokenizer files do not belong to these graphs",
            )
        return RequestChecker(
            config=self.config,
            limits=limits,
            image_token_id=image_token_id,
            eos_token_ids=tuple(int(t) for t in tokens.get("eos_token_ids", self.processor.eos_token_ids)),
            pad_token_id=int(tokens.get("pad_token_id", 0)),
            float_dtype=self._float,
        )

    @property
    def image_token_id(self) -> int:
        return self.requests.image_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.requests.eos_token_ids

    @property
    def limits(self) -> RequestLimits:
        return self.requests.limits

    @property
    def providers(self) -> tuple[str, ...]:
        """The execution providers ONNX Runtime activated, best first."""
        return self.backend.active_providers

    # ---- graphs 1 and 2 ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [N, 3, S, S] -> image_embeds [N, P, H] (the vision graph, ``VISION_CHUNK`` per run)."""
        return self._encode(self.requests.check_pixels(pixel_values))

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        vision = self.backend.graphs["vision"]
        if pixels.shape[0] == 0:
            return np.zeros((0, self.config.image_tokens, self.config.text.hidden_size), self._float)
        chunks = range(0, pixels.shape[0], VISION_CHUNK)
        return np.concatenate(
            [vision.run({"pixel_values": pixels[i : i + VISION_CHUNK]})["image_embeds"] for i in chunks]
        )

    def visual_memory(
        self, image_embeds: np.ndarray, media_offset: np.ndarray
    ) -> tuple[list[np.ndarray], ImagePlacement]:
        """image_embeds [N, P, H] + media_offset [B, L, 2] -> (visual K/V [B, nkv, n_max*P, hd] per hyper
        layer in spec order: key_0, value_0, key_1, ...; the placement). Zero-length K/V without images."""
        embeds = np.asarray(image_embeds)
        expected = (self.config.image_tokens, self.config.text.hidden_size)
        if embeds.ndim != 3 or embeds.shape[1:] != expected:
            raise PromptError(
                f"image_embeds must be [N, {expected[0]}, {expected[1]}], found {list(embeds.shape)}",
                where="image_embeds",
                fix="pass the output of encode_images",
            )
        placement = parse_media_offset(media_offset, embeds.shape[0])
        memory = self._memory(embeds, placement, keep_on_device=False)
        return [memory[name] for name in self._visual_names], placement

    def _memory(self, embeds: np.ndarray | None, placement: ImagePlacement, keep_on_device: bool) -> dict[str, Any]:
        """Visual K/V by input name; ``keep_on_device``: leave them on the GPU for the decoder (CUDA only)."""
        text = self.config.text
        if placement.max_images == 0 or embeds is None:
            empty = np.zeros((placement.counts.shape[0], text.num_key_value_heads, 0, text.head_dim), self._float)
            return dict.fromkeys(self._visual_names, empty)
        per_sample = embeds[placement.gather_index(embeds.shape[0])].astype(self._float)  # [B, n_max, P, H]
        feeds = {"image_embeds": np.ascontiguousarray(per_sample), "image_positions": placement.positions}
        keep = self._visual_names if keep_on_device else ()
        return self.backend.graphs["visual_memory"].run(feeds, keep=keep)

    # ---- generation from ids -----------------------------------------------------------------------
    def stream_ids(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None = None,
        media_offset: np.ndarray | None = None,
        *,
        max_new_tokens: int = 100,
        eos_token_ids: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        timings: dict[str, float] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield the next token of every sample, [B] int64, step by step; finished samples yield the pad id.

        input_ids [B, L]; pixel_values [N, 3, S, S] for all images of the batch; media_offset [B, L, 2]
        (official format; None derives it from ``<|image|>`` tokens, which must number N). End tokens
        default to the export's, the pad id to the export's (0). Every check runs now, before anything
        is computed; ``timings``, when given, is filled with the request's timings.
        """
        started = time.perf_counter()
        request = self.requests.prepare(
            input_ids, pixel_values, media_offset, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed,
        )  # fmt: skip
        return self._steps(request, {} if timings is None else timings, started)

    def trace(
        self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None, media_offset: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """A teacher-forced prefill over the whole sequence, returning every graph output by name:
        ``logits`` [B, L, V] at every position, ``present_key_i`` / ``present_value_i`` per layer, the visual
        memory ``visual_key_j`` / ``visual_value_j`` and ``image_embeds`` (when there are images). For
        validation: it is what two backends are compared on, output by output and layer by layer."""
        request = self.requests.prepare(input_ids, pixel_values, media_offset, max_new_tokens=1)
        placement, ids = request.placement, request.input_ids
        used = int((placement.starts + placement.counts).max()) if placement.max_images else 0
        embeds = self._encode(request.pixel_values[:used]) if request.pixel_values is not None and used else None
        visual = self._memory(embeds, placement, keep_on_device=False)
        cache = self._new_cache(ids.shape[0], ids.shape[1], ids.shape[1])
        out = self._prefill(ids, placement.seen, visual, cache, every_logit=True)
        out = {name: np.asarray(value) for name, value in out.items()}
        if cache is not None:
            out.update(cache.arrays())
        if embeds is not None:
            out.update({"image_embeds": embeds, **{name: np.asarray(v) for name, v in visual.items()}})
        return out

    def generate_ids(self, input_ids: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        """All new tokens [B, K] (K <= max_new_tokens), like ``Owl3Model.generate``; see ``stream_ids``."""
        steps = list(self.stream_ids(input_ids, *args, **kwargs))
        return np.stack(steps, axis=1)

    # ---- the decoding loop -------------------------------------------------------------------------
    def _steps(self, req: Request, timings: dict[str, float], started: float) -> Iterator[np.ndarray]:
        """Vision and visual memory once, prefill, then one cached decoder step per token (see stream_ids)."""
        visual = self._request_memory(req, timings)
        placement, ids = req.placement, req.input_ids
        batch, length = ids.shape
        clock = time.perf_counter()
        cache = self._new_cache(batch, length + req.max_new_tokens, length)
        out = self._prefill(ids, placement.seen, visual, cache)
        timings["prefill_s"] = time.perf_counter() - clock
        history, finished, rng = ids, np.zeros(batch, dtype=bool), req.sampling.generator()
        busy, step = 0.0, 0
        try:
            for step in range(req.max_new_tokens):
                clock = time.perf_counter()
                token = next_tokens(out["logits"][:, -1], history, req.sampling, rng)
                token = np.where(finished, req.pad_token_id, token).astype(np.int64)
                if step == 0:
                    timings["time_to_first_token_s"] = time.perf_counter() - started
                else:
                    busy += time.perf_counter() - clock
                yield token
                finished |= np.isin(token, req.stop)
                if finished.all() or step + 1 == req.max_new_tokens:
                    break
                clock = time.perf_counter()
                history = np.concatenate((history, token[:, None]), axis=1)
                positions = np.full((batch, 1), length + step, dtype=np.int64)
                out = self._decode(token[:, None], positions, placement.counts[:, None], out, visual, cache)
                busy += time.perf_counter() - clock
        finally:
            timings["new_tokens"] = float(step + 1)
            timings["decode_s"] = busy
            timings["decode_tokens_per_s"] = step / busy if step and busy > 0 else 0.0
            timings["total_s"] = time.perf_counter() - started

    def _request_memory(self, req: Request, timings: dict[str, float]) -> dict[str, Any]:
        """Encode the images the placement references (vision once per image), then the visual memory."""
        clock = time.perf_counter()
        placement = req.placement
        used = int((placement.starts + placement.counts).max()) if placement.max_images else 0
        embeds = self._encode(req.pixel_values[:used]) if req.pixel_values is not None and used else None
        timings["vision_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        memory = self._memory(embeds, placement, keep_on_device=True)
        timings["visual_memory_s"] = time.perf_counter() - clock
        return memory

    def _prefill(
        self,
        ids: np.ndarray,
        seen: np.ndarray,
        visual: Mapping[str, Any],
        cache: InPlaceCache | None,
        every_logit: bool = False,
    ) -> dict[str, Any]:
        """The prompt's decoder runs: one, or with the in-place cache ``PREFILL_CHUNK`` tokens at a time (each
        chunk attends to the rows the previous ones wrote, so the attention scores stay chunk x prompt instead
        of prompt x prompt; with GroupQueryAttention only for one sample). ``every_logit``: logits at every
        position (``trace``), else at the last one."""
        batch, length = ids.shape
        positions = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
        chunk = PREFILL_CHUNK if cache is not None and (batch == 1 or self._chunks_batches) else length
        logits, out = [], {}
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            wanted = positions[:, : end - start] if every_logit else None  # relative to the run; None: its last
            out = self._decode(ids[:, start:end], positions[:, start:end], seen[:, start:end], None, visual, cache,
                               logit_positions=wanted)  # fmt: skip
            if every_logit:
                logits.append(np.asarray(out["logits"]))
        return {**out, "logits": np.concatenate(logits, axis=1)} if every_logit else out

    def _decode(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        visible: np.ndarray,
        previous: Mapping[str, Any] | None,
        visual: Mapping[str, Any],
        cache: InPlaceCache | None = None,
        logit_positions: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """One decoder run. ``previous``: the last run's outputs (their present K/V become the past), or for
        the fused decoder ``cache``, the request's in-place buffers; ``logit_positions``: the positions to
        project onto the vocabulary (default: the last one)."""
        if logit_positions is None:  # generation needs the last position only
            logit_positions = np.full((ids.shape[0], 1), ids.shape[1] - 1, dtype=np.int64)
        feeds = {
            "input_ids": np.ascontiguousarray(ids),
            "position_ids": np.ascontiguousarray(positions),
            "visible_images": np.ascontiguousarray(visible, dtype=np.int64),
            "logit_positions": np.ascontiguousarray(logit_positions, dtype=np.int64),
            **visual,
        }
        decoder = self.backend.graphs["decoder"]
        if cache is not None:
            total = cache.length + ids.shape[1]
            cache.reserve(total)
            feeds["seqlens_k"] = np.full(ids.shape[0], total - 1, dtype=np.int32)
            feeds["total_sequence_length"] = np.array(total, dtype=np.int32)
            if cache.binding is None:
                cache.binding = decoder.bind(cache.buffers)
            out = cache.binding.run(feeds, shapes={"logits": (*logit_positions.shape, self.config.text.vocab_size)})
            cache.length = total
            return out
        if previous is None:
            text = self.config.text
            empty = np.zeros((ids.shape[0], text.num_key_value_heads, 0, text.head_dim), self._float)
            past = {name: empty for name, _ in self._past_pairs}
        else:
            past = {name: previous[present] for name, present in self._past_pairs}
        return decoder.run({**feeds, **past}, keep=self._present_names)

    def _new_cache(self, batch: int, limit: int, rows: int = 0) -> InPlaceCache | None:
        """The request's KV buffers for the fused decoder, for up to ``limit`` rows (None for the concatenating
        decoder), with room for ``rows`` at once (the whole prompt: a prompt prefilled in chunks would otherwise
        grow them chunk by chunk); else allocated by the first run (``InPlaceCache.reserve``)."""
        if not self.fused:
            return None
        text = self.config.text
        first = next(t for t in self._specs["decoder"].inputs if t.name == past_key(0))
        dtype = np.dtype(first.dtype)  # float32 in every precision (owl3.export.fused)
        shape = (batch, text.num_key_value_heads, text.head_dim)
        cache = InPlaceCache(self.backend.buffer, tuple(self._past_pairs), shape, dtype, limit)
        cache.reserve(rows)
        return cache

    # ---- chat ----------------------------------------------------------------------------------------
    def generate(
        self,
        messages: Sequence[Mapping[str, str]],
        images: Any = None,
        videos: Sequence[Sequence[Any]] | None = None,
        cut_enable: bool = True,
        **gen: Any,
    ) -> GenerationResult:
        """Answer ``messages`` (with images or videos, as Owl3Processor takes them). ``gen``: the options of
        ``stream_ids`` (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, ...)."""
        timings: dict[str, float] = {}
        request, steps = self._chat(messages, images, videos, cut_enable, gen, timings)
        tokens = [int(step[0]) for step in steps]
        stop = set(request.stop.tolist())
        ended = [i for i, t in enumerate(tokens) if t in stop]
        text = self.processor.decode(tokens[: ended[0]] if ended else tokens)
        return GenerationResult(
            text=text,
            token_ids=tuple(tokens),
            prompt_tokens=int(request.input_ids.shape[1]),
            finish_reason="stop" if ended else "length",
            timings=timings,
            providers=tuple(self.providers),
        )

    def stream(
        self,
        messages: Sequence[Mapping[str, str]],
        images: Any = None,
        videos: Sequence[Sequence[Any]] | None = None,
        cut_enable: bool = True,
        *,
        timings: dict[str, float] | None = None,
        **gen: Any,
    ) -> Iterator[str]:
        """Text pieces of the answer as they are generated; they concatenate to ``generate(...).text``.
        Checks run now; ``timings``, when given, is filled as in ``GenerationResult.timings``."""
        request, steps = self._chat(messages, images, videos, cut_enable, gen, {} if timings is None else timings)
        stop = set(request.stop.tolist())
        return stream_text(self.processor.decode, (int(step[0]) for step in steps), stop)

    def _chat(
        self,
        messages: Sequence[Mapping[str, str]],
        images: Any,
        videos: Sequence[Sequence[Any]] | None,
        cut_enable: bool,
        gen: dict[str, Any],
        timings: dict[str, float],
    ) -> tuple[Request, Iterator[np.ndarray]]:
        started = time.perf_counter()
        inputs = self.processor(messages, images=images, videos=videos, cut_enable=cut_enable, return_tensors="np")
        timings["preprocess_s"] = time.perf_counter() - started
        request = self.requests.prepare(inputs["input_ids"], inputs["pixel_values"], inputs["media_offset"], **gen)
        return request, self._steps(request, timings, started)

    def __repr__(self) -> str:
        flavour = f", flavour={self.flavour}" if self.flavour else ""
        providers = list(self.providers)
        return f"Owl3Session({str(self.export_dir)!r}, precision={self.precision}{flavour}, providers={providers})"
