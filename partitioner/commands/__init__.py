"""CLI verb handlers: model verbs (zoo, cuts, profile, split, plan) and the solver verb."""

from partitioner.commands.model import cuts, plan, profile, split, zoo_build, zoo_list
from partitioner.commands.solve import solve

__all__ = ["cuts", "plan", "profile", "solve", "split", "zoo_build", "zoo_list"]
