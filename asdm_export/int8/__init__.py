"""INT8: takes a bundle and calibration prompts, produces a calibration set, the inputs its UNet graphs see
along real trajectories (calibrate.py), and from it a Q/DQ INT8 bundle (quantize.py)."""
