"""Flag rules (issue detectors), registered in :data:`pipeline.registry.RULES`.

Families, one module each: threshold rules on one score (threshold.py: quantile, mad, gmm),
gradient-space outliers (outliers.py: isolation-forest), confident learning (confident.py),
harm to the validation loss (influence.py: the harmful issue type).
Shared pieces in base.py, benchmark metrics in metrics.py. Formulas: docs/methods.md §2.
Import order is the order users see the rules in.
"""
from pipeline.rules import labels  # noqa: F401,I001  (registers the label issue type: first in flags.csv)
from pipeline.rules import threshold  # noqa: F401,I001  (registers quantile, mad, gmm)
from pipeline.rules import outliers  # noqa: F401,I001  (registers isolation-forest)
from pipeline.rules import confident  # noqa: F401,I001  (registers confident)
from pipeline.rules import duplicates  # noqa: F401,I001  (registers the duplicate issue type)
from pipeline.rules import images  # noqa: F401,I001  (registers dark, light, blurry, low_information, odd_size, odd_aspect_ratio, grayscale)
from pipeline.rules import influence  # noqa: F401,I001  (registers the harmful issue type: val_influence < 0)
