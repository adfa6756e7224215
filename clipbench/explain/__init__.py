"""Explainability for CLIP models: Grad-ECLIP and its baselines as image and text heatmaps, and their
faithfulness (deletion and insertion curves). Methods are plain functions on the backbone interface;
:data:`~clipbench.explain.registry.METHODS` names them."""

from clipbench.explain.base import Targets
from clipbench.explain.registry import METHODS, UnsupportedMethod, check_methods, explain, supported_methods
from clipbench.explain.text import grad_eclip_text

__all__ = ["METHODS", "Targets", "UnsupportedMethod", "check_methods", "explain", "grad_eclip_text", "supported_methods"]
