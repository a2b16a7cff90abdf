"""Evaluation: metrics with intervals, the evaluate, explain (Grad-CAM) and report stages."""
