"""One function per method, `run_<method>(config, ..., hooks)`: it reads the method's inputs, builds and runs it from
the validated config, and returns everything its stage writes (an `Outcome`). The DVC entry points in `stages/`
call it once and write what it returns; `make bench` times the same `fit_*` it trains with.

Import the module of the method (`pipeline.methods.sft`), not this package: a stage's DVC deps are the modules it
imports, and a change to one method must not rerun the others."""
