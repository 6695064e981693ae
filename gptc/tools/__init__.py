"""The tools on top of the compiler and runtime: CLI, trainer, sampler, data, checkpoints, bench."""
