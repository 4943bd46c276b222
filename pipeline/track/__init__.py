"""Tracking: the MLflow runs of a pipeline run and its stages, and the provenance (machine, inputs) they carry."""
