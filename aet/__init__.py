"""The `aet` command line: one entry point dispatching to training, serving and client jobs."""
