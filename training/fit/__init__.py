"""The training loop: one epoch (with distillation), batched prediction, progress bars."""
