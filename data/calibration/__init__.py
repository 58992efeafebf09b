"""Calibration results (JSON) written by calibration/calibrate.py, installed as carkin.calibrations."""
