"""Shared pytest configuration for the lungmets tests.

Tests build their inputs with ``histo.synthetic`` rather than reading files from the repository.
GUI tests carry ``@pytest.mark.napari`` and long ones ``@pytest.mark.slow``, so that
``pytest -m "not napari and not slow"`` runs the fast core in seconds.
"""
