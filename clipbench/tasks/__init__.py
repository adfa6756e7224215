"""Evaluation tasks: ``evaluate.py task=<name>`` runs ``clipbench.tasks.<name>.run(cfg, models, out)``."""
