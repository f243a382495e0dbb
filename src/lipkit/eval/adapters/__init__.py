"""Few-shot adapters on frozen features: zero-shot, linear probe, Tip-Adapter(-F) and GDA.

Each registers a fit function in :data:`ADAPTERS`; :func:`lipkit.eval.fewshot.run_fewshot` runs them.
"""

from lipkit.eval.adapters import gda, probe, tip
from lipkit.eval.adapters.base import ADAPTERS, Adapted, cv_folds, select_on_folds, top1, zeroshot_logits

__all__ = ["ADAPTERS", "Adapted", "cv_folds", "gda", "probe", "select_on_folds", "tip", "top1", "zeroshot_logits"]
