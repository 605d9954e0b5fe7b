"""owl3.tokenizer: loading and checking tokenizer.json, the deterministic demo tokenizer, the HF layout."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from owl3.errors import TokenizerError, UsageError
from owl3.tokenizer import (
    SPECIAL_TOKENS,
    build_demo_tokenizer,
    load_tokenizer,
    token_id,
    write_tokenizer,
)


@pytest.fixture(scope="module")
def demo() -> Tokenizer:
    return build_demo_tokenizer()


def test_demo_tokenizer_is_deterministic_within_a_process() -> None:
    assert build_demo_tokenizer().to_str() == build_demo_tokenizer().to_str()


def test_demo_tokenizer_is_deterministic_across_processes(demo: Tokenizer) -> None:
    code = (
        "import hashlib; from owl3.tokenizer import build_demo_tokenizer; "
        "print(hashlib.sha256(build_demo_tokenizer().to_str().encode()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(demo.to_str().encode()).hexdigest()


@pytest.mark.parametrize("vocab_size", [260, 300, 512])
def test_demo_vocab_fits_the_requested_size(vocab_size: int) -> None:
    tokenizer = build_demo_tokenizer(vocab_size)
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    assert len(ids) <= vocab_size
    assert max(ids) < vocab_size
    special_ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert special_ids == sorted(special_ids) and special_ids[-1] == max(ids)  # appended last, Qwen2 order


def test_demo_512_fills_its_vocab(demo: Tokenizer) -> None:
    assert demo.get_vocab_size(with_added_tokens=True) == 512
    assert token_id(demo, "<|image|>") == 511


def test_demo_vocab_too_small_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="vocab_size 100 is too small") as info:
        build_demo_tokenizer(100)
    assert "260" in str(info.value)


def test_special_tokens_encode_to_one_id_each(demo: Tokenizer) -> None:
    for token in SPECIAL_TOKENS:
        assert demo.encode(token, add_special_tokens=False).ids == [demo.token_to_id(token)]


def test_demo_round_trips_text_and_splits_digits(demo: Tokenizer) -> None:
    text = "<|im_start|>user\nHow many red circles? 123 ünïcode 😀<|im_end|>"
    encoding = demo.encode(text, add_special_tokens=False)
    assert demo.decode(encoding.ids, skip_special_tokens=False) == text
    digits = [t for t in encoding.tokens if t in ("1", "2", "3")]
    assert digits == ["1", "2", "3"]  # Qwen2 splits numbers into single digits


def test_write_then_load_round_trips(tmp_path: Path, demo: Tokenizer) -> None:
    path = write_tokenizer(demo, tmp_path / "model")
    assert path == tmp_path / "model" / "tokenizer.json"
    loaded = load_tokenizer(tmp_path / "model")
    text = "<|im_start|>system\n<|im_end|>\nDescribe the image.<|image|>"
    assert loaded.encode(text).ids == demo.encode(text).ids
    assert load_tokenizer(path).to_str() == loaded.to_str()  # the file itself is accepted too


def test_written_configs_have_the_hugging_face_layout(tmp_path: Path, demo: Tokenizer) -> None:
    write_tokenizer(demo, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in decoder.items()} == {t: demo.token_to_id(t) for t in SPECIAL_TOKENS}
    assert all(v["special"] and not v["normalized"] for v in decoder.values())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["bos_token"] is None
    special_map = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special_map["eos_token"]["content"] == "<|im_end|>"
    assert "<|image|>" in special_map["additional_special_tokens"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_write_refuses_to_overwrite(tmp_path: Path, demo: Tokenizer) -> None:
    write_tokenizer(demo, tmp_path)
    with pytest.raises(UsageError, match="already exists"):
        write_tokenizer(demo, tmp_path)
    write_tokenizer(demo, tmp_path, overwrite=True)


def test_transformers_reads_the_written_directory(tmp_path: Path, demo: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    write_tokenizer(demo, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nWhich image shows 3 blue stars?<|image|><|im_end|>"
    assert hf(text).input_ids == demo.encode(text, add_special_tokens=False).ids
    assert hf.convert_tokens_to_ids("<|image|>") == demo.token_to_id("<|image|>")


def test_missing_tokenizer_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="found none") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


@pytest.mark.parametrize("content", ["", "{not json", '{"version": "1.0"}'])
def test_unparseable_tokenizer_file_names_the_path(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match="could not be parsed") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_truncated_tokenizer_file_is_rejected(tmp_path: Path, demo: Tokenizer) -> None:
    text = demo.to_str()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(TokenizerError, match="could not be parsed"):
        load_tokenizer(tmp_path)


def test_missing_special_tokens_are_listed(tmp_path: Path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>")])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="lacks the chat tokens") as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert "'<|im_end|>', '<|image|>'" in message and str(tmp_path) in message


def test_special_tokens_that_are_not_added_tokens_are_rejected(tmp_path: Path) -> None:
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, "[UNK]"))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "<|image|>" into "<|", "image", "|>"
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="do not encode to one id"):
        load_tokenizer(tmp_path)


def test_token_id_of_an_unknown_token(demo: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=re.escape("lacks '<|video|>'")):
        token_id(demo, "<|video|>")
