"""The core every family builds on: one-line errors and exit codes, atomic writes, the typed
schema of params.yaml, running a stage, devices and threads, and provenance."""
