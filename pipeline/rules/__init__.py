"""Flag rules (issue detectors), registered in :data:`pipeline.registry.RULES`.

Families, one module each: threshold rules on one score (threshold.py: quantile, mad, gmm),
gradient-space outliers (outliers.py: isolation-forest), confident learning (confident.py).
Shared pieces in base.py, benchmark metrics in metrics.py. Formulas: docs/methods.md §2.
Import order is the order users see the rules in.
"""
from pipeline.rules import threshold  # noqa: F401,I001  (registers quantile, mad, gmm)
from pipeline.rules import outliers  # noqa: F401,I001  (registers isolation-forest)
from pipeline.rules import confident  # noqa: F401,I001  (registers confident)
