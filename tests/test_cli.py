"""The command line: the demo model on a fresh cache, streaming, and the error contract (one line, exit code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from owl3.cli import main
from owl3.demo import demo_image


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OWL3_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_help_shows_the_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint -> reference model -> quantize -> export ONNX" in out and "generate" in out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: owl3-export" in capsys.readouterr().out


def test_generate_on_a_fresh_machine_answers_with_the_packaged_model(fresh_home: Path, tmp_path: Path, capsys) -> None:
    """The default model is the trained one shipped in the package: nothing is built, and it answers
    questions about the built-in picture (a fixed scene of its synthetic task: a red circle, a yellow
    triangle, a blue square) as the scene says."""
    assert main(["generate", "--max-new-tokens", "60"]) == 0
    captured = capsys.readouterr()
    assert not fresh_home.exists()
    assert "built-in demo picture" in captured.err and "tokens in" in captured.err
    assert captured.out.startswith("There are 3 shapes: a red circle at the top left")
    picture = tmp_path / "demo.png"
    demo_image().save(picture)
    for question, answer in [
        ("How many shapes are there?", "3"),
        ("What colour is the circle?", "red"),
        ("What shape is the yellow object?", "triangle"),
        ("What shape is the blue object?", "square"),
        ("What colour is the triangle?", "yellow"),
    ]:
        prompt = f"<|image|>{question} Answer the question using a single word or phrase."
        assert main(["generate", "--image", str(picture), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
        assert capsys.readouterr().out.strip() == answer, question


def test_without_a_packaged_model_a_seeded_random_one_is_built_once(
    fresh_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from owl3 import demo

    monkeypatch.setattr(demo, "packaged_model_dir", lambda: tmp_path / "not-shipped")
    assert main(["generate", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert (fresh_home / demo.RANDOM_NAME / "model.safetensors").is_file()
    assert "images/crops/frames" in captured.err
    # Deterministic: the same answer again, from the cached model.
    assert main(["generate", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == captured.out


def test_generate_with_images_and_sampling(fresh_home: Path, tmp_path: Path, capsys) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (120, 80), (200, 10, 10)).save(image)
    args = ["generate", "--image", str(image), "--image", str(image), "--no-cut", "--prompt", "Same?"]
    assert main([*args, "--max-new-tokens", "4", "--do-sample", "--seed", "3", "--top-p", "0.9"]) == 0
    assert "2 images/crops/frames" in capsys.readouterr().err


def test_info_checks_the_checkpoint(fresh_home: Path, capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "checked strictly, all finite" in out and "hyper layers   [0, 2]" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["generate", "--model", "/nonexistent/model"], 3, "expected a model directory, found nothing"),
        (["generate", "--image", "/nonexistent.png", "--prompt", "x"], 3, "nonexistent.png"),
        (["generate", "--temperature", "0", "--do-sample", "--prompt", "x"], 2, "temperature must be > 0"),
        (["generate", "--prompt", "<|image|><|image|>two", "--image", "IMG"], 3, "2 <|image|> placeholders but 1"),
    ],
)
def test_errors_are_one_line_with_the_contract_exit_code(
    fresh_home: Path, tmp_path: Path, capsys, argv: list[str], code: int, message: str
) -> None:
    image = tmp_path / "one.png"
    Image.new("RGB", (40, 40)).save(image)
    argv = [str(image) if a == "IMG" else a for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("owl3-export: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_empty_image_file_is_rejected(fresh_home: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert main(["generate", "--image", str(empty), "--prompt", "x"]) == 3
    assert "empty.jpg" in capsys.readouterr().err


def test_bad_usage_exits_2(capsys) -> None:
    assert main(["generate", "--dtype", "int3"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_precision_runs_the_export_pipeline_then_run_answers_from_it(
    fresh_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # the default output: exports/<model name>-<precision>
    out = Path("exports") / "owl3-demo-shapes-v1-fp32"
    assert main(["--precision", "fp32", "--no-validate"]) == 0  # both flavours by default
    captured = capsys.readouterr()
    trt = out.with_name(f"{out.name}-trt")
    assert captured.out.split() == [str(out), str(trt)] and "exported decoder.onnx" in captured.err
    assert json.loads((out / "manifest.json").read_text())["fused"]  # ONNX Runtime's fused decoder
    assert json.loads((trt / "manifest.json").read_text())["tensorrt_readiness"]["10.3"]["ready"]
    assert main(["--precision", "fp32", "--no-validate"]) == 2  # never overwrites silently
    assert "pass --force" in capsys.readouterr().err
    assert main(["run", "--export", str(out), "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert "time to first token" in capsys.readouterr().err
    assert main(["run", "--export", str(tmp_path / "missing")]) == 3
    assert "expected an owl3-export artifact" in capsys.readouterr().err


def test_sigterm_removes_the_staging_directory_and_exits_130(tmp_path) -> None:
    import signal
    import subprocess
    import sys

    code = f"""
import sys, time
from pathlib import Path
import owl3.cli
from owl3.artifacts import staged_output

def slow_stage(args):
    with staged_output(Path({str(tmp_path / "out")!r})) as staging:
        (staging / "half-written").write_text("x")
        print("READY", flush=True)
        time.sleep(60)

owl3.cli.COMMANDS["info"] = slow_stage
sys.exit(owl3.cli.main(["info"]))
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "READY"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # no output and no staging directory left
