"""The Ray Train + DeepSpeed runtime shared by reward-model training (`rayapp.rm`) and ReFL (`rayapp.refl`).

- `config.TrainingConfig`: the settings both loops share, under one set of names.
- `engine`: DeepSpeed config and engine initialisation, precision, collectives.
- `checkpoints`: checkpoint save with per-rank completion markers, newest-complete discovery, exact-step resume,
  metric reports.
- `cluster`: connecting to Ray, sizing workers to the cluster, failing fast on requests it can never meet.
"""
