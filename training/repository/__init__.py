"""The model repository from training's side: the preprocessing recipe read from ``config.pbtxt``, and the layout and
configs ``training.publish`` writes (names, versions, ensembles, the fused combine step)."""
