"""Method classes the config checks must refuse (tests/methods/test_registry.py)."""

from cwps_lightning.methods.base import Method
from cwps_lightning.methods.baselines import FineTune


class Nameless(Method):
    pass


class AlsoFineTune(FineTune):  # inherits name = "finetune"
    pass


class Sharing(FineTune):
    name = "sharing"
    shares_tasks = True


class NamedCwps(FineTune):
    name = "cwps"
