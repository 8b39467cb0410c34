"""`tuna-jax plan`: will a training config fit a TPU slice or a GPU mesh. ``hardware.py`` knows the chips
and slices, ``aot.py`` builds train's step over abstract values and compiles it ahead of time,
``flops.py`` counts the FLOPs it executes and the model FLOPs, ``estimate.py`` stands in for a compile
where the hardware is not at hand; ``plan.py`` puts them together, ``search.py`` looks for the
overrides that fit."""
