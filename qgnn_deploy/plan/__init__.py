"""Compiled plans: an integer model lowered once into a flat list of steps.

::

    from qgnn_deploy.plan import compile_plan
    plan = compile_plan(int_model)        # Plan: buffers + steps (plan.py lists the vocabulary)
    print(plan.summary())

The ``cpu`` backend runs a plan in one native call per episode batch
(:mod:`qgnn_deploy.backends.cpu_plan`); the episode itself is described once, in
``IntModel.episode``, which :class:`PlanBuilder` runs symbolically.
"""
from __future__ import annotations

from .builder import PlanBuilder, Value
from .plan import Buffer, Plan, Step

#: the label-derived inputs of an episode plan, in ``episode_graph`` order
GRAPH_INPUTS = ("distribution_node", "point_edge", "distribution_edge", "onehot")


def compile_plan(model) -> Plan:
    """Lower ``model`` (an :class:`~qgnn_deploy.intmodel.IntModel`) into a plan for its
    episode geometry (N images of S px per task; any number of tasks)."""
    cfg = model.config
    n, s, ns = cfg.num_nodes, cfg.image_size, cfg.num_supports
    b = PlanBuilder()
    images = b.input("images", (n, 3, s, s))
    shapes = {"distribution_node": (n, ns), "point_edge": (n, n), "distribution_edge": (n, n),
              "onehot": (ns, cfg.way)}
    graph = tuple(b.input(name, shapes[name]) for name in GRAPH_INPUTS)
    out = model.episode(b, images, graph)
    return b.finish({"logits": out.logits, "point_edges": list(out.point_edges),
                     "node_similarities": list(out.node_similarities),
                     "distribution_edges": list(out.distribution_edges)},
                    nodes=n, image_size=s, way=cfg.way, shot=cfg.shot, generations=model.generations)


__all__ = ["compile_plan", "Plan", "Step", "Buffer", "PlanBuilder", "Value"]
