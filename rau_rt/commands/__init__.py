"""The pipeline commands of the CLI: `rau-rt run`, `demo` and `bench` (one module each).

CLI glue (the `cli` layer of ARCHITECTURE.md rule 3): they wire sources, the pipeline, sinks
and the reports, and `demo` may call `rau_rt.export` to build its bundle.
"""
