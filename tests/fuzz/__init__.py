"""Fuzz targets (atheris, coverage-guided): `make fuzz` runs them, `make test` a short run."""
