"""The shipped UI workflows' native reroutes (workflows/build.py's buses), read from the committed files: every
link routed through them is drawn along one chain of points from its output to its input, each point lists the
links through it, and the chain leaves the bus level with the input it feeds. (The frontend drops or redraws
routes whose points do not agree; the integration tier loads the files in the real frontend.)"""
from __future__ import annotations

import glob
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = sorted(glob.glob(os.path.join(HERE, "..", "workflows", "*.json")))


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_reroutes_chain_each_link_from_its_output_to_its_input(path):
    ui = json.load(open(path))
    extra = ui.get("extra", {})
    reroutes = {r["id"]: r for r in extra.get("reroutes", [])}
    ext = {e["id"]: e["parentId"] for e in extra.get("linkExtensions", [])}
    if os.path.basename(path) == "ltx2_compare_ranks.json":
        assert len(ext) >= 30  # the shared inputs of its four branches go by buses
    links = {lk[0]: lk for lk in ui["links"]}
    nodes = {n["id"]: n for n in ui["nodes"]}
    through = {rid: set() for rid in reroutes}
    for lid, last in ext.items():
        assert lid in links, f"link {lid} routed but not in the graph"
        chain, rid = [], last
        while rid is not None:
            assert rid in reroutes and rid not in chain, f"link {lid}: broken or cyclic chain at reroute {rid}"
            chain.append(rid)
            rid = reroutes[rid].get("parentId")
        for rid in chain:
            through[rid].add(lid)
        _, _, _, target, slot, _ = links[lid]
        n = nodes[target]
        assert n["inputs"][slot]["link"] == lid
        assert reroutes[last]["pos"][1] == n["pos"][1] + 14 + 20 * slot  # level with the input it feeds
        assert reroutes[last]["pos"][0] < n["pos"][0]  # and left of it: the link enters from its side
    for rid, r in reroutes.items():
        assert set(r.get("linkIds") or []) == through[rid], f"reroute {rid} lists other links than pass it"
