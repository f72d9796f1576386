"""The training engine: one loop on accelerate, checkpoints, probing and look-ahead.

- ``loop``: the Trainer (build a run, the step loop, the hooks it calls) and ``train``;
- ``step``: one optimizer step with exact gradient accumulation;
- ``evaluation``: scheduled and on-request per-domain evaluation; ``metrics``: records, counters;
- ``state``: ``TrainState``, the typed branch state probes, losses and adapters take;
- ``probe`` + ``snapshot`` + ``alignment``: branch runs from a snapshot, restored exactly;
- ``checkpoint``: everything needed to continue exactly; ``rundir``: the run directory;
- ``build``: tokenizer, model (full or LoRA), optimizer, schedule, the final save;
- ``process``: the accelerator, seeding, signals, FSDP2 sharding, progress.
"""
