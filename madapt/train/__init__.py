"""Training: one adapter's loop and the two drivers that run it.

- `settings`: Ludwig's trainer section resolved into plain values (steps, schedule, optimizer, cadence).
- `loop`: the ONE loop every driver runs: the optimizer step (`Trainer`), held-out evaluation, early
  stopping and step tracking (`Monitor`), the metrics a version is published with, the ensemble dispatch.
- `local`: the local driver, `train_local` (`backend.type: local`).
- `distributed`: the Ray Train driver, `train_ray` and `train_adapters`; `spec` (what a worker is told),
  `worker` (`train_loop_per_worker`), `strategies` (FSDP2, DDP, DeepSpeed) and `checkpoints` (write,
  resume, publish).
- `pack`: packed training (a config's adapters in one run on one base, each row through its own adapter):
  which adapters can share a pack, `PackTrainer` and its lanes; `local.train_local_pack` runs a pack in this
  process, `pack_ray.train_ray_pack` as one Ray Train run of `pack_worker.pack_loop_per_worker`.

Imports flow one way: settings <- loop <- local; loop <- spec <- strategies <- checkpoints <- worker <-
distributed; pack <- local, pack_worker; worker, checkpoints <- pack_worker <- pack_ray; distributed <-
pack_ray. The package may import madapt's config, data, sources, splits, models, lora, adapter_types,
store, tracking, charts, cluster, evaluate and ensemble; none of those imports it (only the CLI, the API,
bench/ and jobs/ do). Importing the package itself loads nothing: import the module you need.
"""
