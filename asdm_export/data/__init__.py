"""The data files the code reads: engine specs and TensorRT's operator table (``engines/``), calibration prompts
(``calibration/``). They live at the top of the repository, where people edit them; ``data/engines`` and
``data/calibration`` are links to them, so that a wheel (which takes them as package data) and a checkout find
them at the same path."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
ENGINES_DIR = DATA_DIR / "engines"  # engine specs (*.yaml) and tensorrt-onnx-ops.yaml
CALIBRATION_PROMPTS = DATA_DIR / "calibration" / "prompts.txt"
