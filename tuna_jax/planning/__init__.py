"""`tuna-jax plan`: will a training config fit a TPU slice or a GPU mesh, from an ahead-of-time compile
(``aot.py``), the analytic FLOPs (``flops.py``) and, without the hardware, a memory estimate (``estimate.py``);
``plan.py`` puts them together, ``search.py`` looks for the overrides that fit."""
