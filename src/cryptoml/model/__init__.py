"""The ProductionEnsemble, its walk-forward training and evaluation, and its verified files on disk."""
