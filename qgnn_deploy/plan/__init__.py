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

#: the label-derived inputs of a DPGN episode plan, in ``episode_graph`` order (a model's
#: own: ``model.family_spec.graph_inputs(model.config)``)
GRAPH_INPUTS = ("distribution_node", "point_edge", "distribution_edge", "onehot")


def compile_plan(model) -> Plan:
    """Lower ``model`` (an :class:`~qgnn_deploy.intmodel.IntModel` of any family) into a plan
    for its episode geometry (N images of S px per task; any number of tasks). Its inputs
    are ``images`` and the family's label-derived graph inputs, its outputs the family's
    named results (DPGN: logits, point_edges, node_similarities, distribution_edges; EGNN:
    logits, embeddings, sim_edges, dsim_edges)."""
    cfg = model.config
    fam = model.family_spec
    n, s = cfg.num_nodes, cfg.image_size
    b = PlanBuilder()
    images = b.input("images", (n, 3, s, s))
    graph = tuple(b.input(name, shape) for name, shape in fam.graph_inputs(cfg))
    out = model.episode(b, images, graph)
    return b.finish(fam.named_outputs(out), nodes=n, image_size=s, way=cfg.way, shot=cfg.shot,
                    generations=model.generations, family=fam.name)


__all__ = ["compile_plan", "Plan", "Step", "Buffer", "PlanBuilder", "Value"]
