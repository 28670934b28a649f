"""Metrics, studies and plots shared by the families (plain numpy/torch/matplotlib)."""
