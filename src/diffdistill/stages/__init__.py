"""The stages (prepare, pretrain / finetune, check, sample, evaluate, report) and sweeps: each reads and writes
folders of a run (see docs/architecture.md). Use them through `diffdistill.api` or the command line."""
