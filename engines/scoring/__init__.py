"""Turning model output into answers and confidences: prompts, few-shot examples, candidate values, confidence and
calibration maths.
"""
