"""model: dataset ingestion, pure features, Isolation Forest training, artifacts and scoring.

Public modules: ``dataset`` (load/download AI4I), ``features`` (the one feature function),
``artifact`` (save/load with a model card), ``train`` (fit and calibrate), ``scoring``
(scorers with one score direction: higher = more anomalous).
"""
