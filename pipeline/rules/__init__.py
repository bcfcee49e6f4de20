"""Flag rules (issue detectors), registered in :data:`pipeline.registry.RULES`.

Families, one module each: threshold rules on one score (threshold.py: quantile, mad, gmm),
gradient-space outliers (outliers.py: isolation-forest), confident learning (confident.py),
harm to the validation loss (influence.py: the harmful issue type).
Shared pieces in base.py, benchmark metrics in metrics.py. Formulas: docs/methods.md §2.
The RULES and ISSUES registries import these modules on first use (pipeline/registry.py
lists them, in the order users see the rules in); nothing here imports them.
"""
