"""The staged pipeline: ``tuna-jax pipeline CONFIG`` and ``tuna-jax demo``.

A pipeline file declares stages (``spec.py``: references between them, ``foreach`` instances, one-line
errors); each stage kind composes the Python API of one step (``stages.py``, most of them made from the
options of the ``tuna-jax`` command that runs the step alone, ``stage.py``); ``engine.py`` runs a plan,
skipping finished stages, resuming interrupted ones and running again exactly the stages whose inputs or
config changed, with a manifest in every stage folder (``manifest.py``). ``heldout.py`` holds the demo's
data and evaluation stages; the demo itself is the pipeline file ``demo.yaml`` here.

(A package rather than one ``pipeline.py``: the plan, the engine, the kinds and the demo's evaluation are four
ideas, each read on its own.)
"""
