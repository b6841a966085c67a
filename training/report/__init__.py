"""Reports: metrics, plots, model cards, and run directories read back."""
