"""The ``tuna-jax`` commands, one module per verb: a ``Config`` dataclass (defaults and help written once, in
field metadata: ``tuna_jax/io/fields.py``) and ``run(cfg) -> int``. ``cli.py`` makes the parser from the
dataclasses; the pipeline (``pipeline/stage.py``) builds the same ``Config`` with the config system and calls
the same ``run``. Settings several verbs share (``shared.py``: the mesh, the endpoint, the budget) are
dataclasses a ``Config`` inherits; settings the library reads (``TeacherSettings``, ...) are declared in the
library module that reads them.

Command modules import nothing heavy at module level (jax, torch come inside ``run``): ``tuna-jax --help``
imports them all.
"""
