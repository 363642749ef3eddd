"""The trigger rule language: campaign documents, the expression compiler and its evaluator.

The cloud validates with exactly this code and the agent runs it, so a rule that passes
``fleetloop rules validate`` is a rule the device can compile.
"""

from fleetloop_shared.rules.campaign import CampaignSpec, check_against_catalog, parse_campaign
from fleetloop_shared.rules.expression import Expression, Kind, compile_expression
from fleetloop_shared.rules.selector import selector_matches
from fleetloop_shared.rules.vector import Evaluator, ModelScorer, WindowSource

__all__ = [
    "CampaignSpec",
    "Evaluator",
    "Expression",
    "Kind",
    "ModelScorer",
    "WindowSource",
    "check_against_catalog",
    "compile_expression",
    "parse_campaign",
    "selector_matches",
]
