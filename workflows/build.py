"""Writes the shipped workflows, each in both formats, from one description per graph:
workflows/<name>.json (UI: drag into ComfyUI; ComfyUI lists it under this pack's templates)
and workflows/api/<name>.json (API: POST /prompt, `liteffn-queue`).

The UI format needs every node's inputs, outputs and widget order, which only ComfyUI knows:
    python workflows/build.py --object-info http://127.0.0.1:8188   (a running ComfyUI with this pack)
    python workflows/build.py --object-info object_info.json        (its saved /object_info)
Run it after changing a graph below or a node's inputs, and commit the JSON it writes."""
from __future__ import annotations

import argparse
import json
import os
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))

# File names of ComfyUI's own LTX-2 templates (video_ltx2_t2v), so a user's models folder already matches.
CKPT = "ltx-2-19b-dev-fp8.safetensors"
GEMMA = "gemma_3_12B_it_fp4_mixed.safetensors"
STATS = "ltx-2-19b-dev_liteffn_stats"          # written by ltx2_calibrate_and_compress
COMPRESSED = "ltx-2-19b-dev_liteffn_r64"       # written by ltx2_calibrate_and_compress
MODEL_URLS = {
    CKPT: ("checkpoints", "https://huggingface.co/Lightricks/LTX-2/resolve/main/ltx-2-19b-dev-fp8.safetensors"),
    GEMMA: ("text_encoders", "https://huggingface.co/Comfy-Org/ltx-2/resolve/main/split_files/text_encoders/"
                             "gemma_3_12B_it_fp4_mixed.safetensors"),
}
NEGATIVE = "blurry, low quality, still frame, frames, watermark, overlay, titles, has blurbox, has subtitles"
PROMPT = ("A close-up of a potter's hands shaping wet clay on a spinning wheel in a sunlit workshop. The clay rises "
          "into a tall vase as water drips from the fingers; dust floats in the light. The wheel hums steadily and "
          "a radio plays quiet jazz in the background. The camera slowly pushes in.")
CALIBRATION_PROMPTS = [
    PROMPT,
    "A red vintage car drives along a coastal road at sunset, waves crashing against the rocks below. The engine "
    "roars as it passes the camera; seagulls call overhead. Wide shot, the camera pans to follow the car.",
    "A woman in a yellow raincoat laughs and talks to a friend on a busy city street at night, neon signs "
    "reflecting in puddles. Traffic noise and distant music; she says: \"Let's get out of the rain.\" Medium shot.",
]
# Video: width and height multiples of 32, frames 8k+1 (ComfyUI's template notes); 97 frames at 25 fps ~ 4 s.
WIDTH, HEIGHT, FRAMES, FPS, STEPS, CFG, SEED = 768, 512, 97, 25, 20, 4.0, 42

GRAY, BLUE, GREEN, PURPLE = "#444", "#3f789e", "#3f7e4f", "#6a4f8e"
# Input types the frontend draws as widgets (COMFY_DYNAMICCOMBO_V3: a combo that adds the inputs of its choice)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COMFY_DYNAMICCOMBO_V3")


class Graph:
    def __init__(self, title: str):
        self.title, self.nodes, self.groups, self.buses = title, [], [], []

    def node(self, cls: str, pos, title: str | None = None, w: int = 320, h: int | None = None, **inputs) -> "Node":
        n = Node(len(self.nodes) + 1, cls, pos, title, w, inputs, h)
        self.nodes.append(n)
        return n

    def note(self, pos, text: str, title: str, size=(420, 200)):
        self.nodes.append(Note(len(self.nodes) + 1, pos, text, title, size))

    def bus(self, src: "Out", targets: list, x: float | None = None, lane: float | None = None,
            drop: float | None = None):
        """Draw src's links to targets [(node, input name)] along one line (the frontend's native reroutes):
        from the output to x = drop, up or down to y = lane, along the lane to x, then down x, leaving it level
        with each target's input. Without a lane the line starts level with the output. Targets given as
        (node, input name, x) instead each leave the lane at their own x, down to their input. Links only:
        the graph and its API prompt are the same without it."""
        self.buses.append((src, targets, x, lane, drop))

    def group(self, title: str, bounding, color=BLUE):
        x, y, w, h = bounding  # nodes' area; the group's title bar goes above their title bars
        self.groups.append(dict(id=len(self.groups) + 1, title=title, bounding=[x, y - 35, w, h + 35], color=color,
                                font_size=24, flags={}))

    # ---------------------------------------------------------------- API format
    def api(self, info: dict | None = None) -> dict:
        """With `info` (/object_info), also the declared defaults the UI format has to write (see _layout)."""
        out = {}
        for n in self.nodes:
            if isinstance(n, Node):
                inputs = {k: ([str(v.node.id), v.slot] if isinstance(v, Out) else v) for k, v in n.inputs.items()}
                if info is not None:
                    inputs.update({k: vals[0] for k, _, vals, filled in _layout(n, info[n.cls])[1] if filled})
                out[str(n.id)] = {"class_type": n.cls, "inputs": inputs, "_meta": {"title": n.title or n.cls}}
        return out

    # ---------------------------------------------------------------- UI format
    def ui(self, info: dict) -> dict:
        links, order = [], _topological(self)
        ui_nodes, link_of = [], {}  # (node id, input name) -> (link id, input slot)
        for n in self.nodes:
            if isinstance(n, Note):
                ui_nodes.append(n.ui(order[n.id]))
                continue
            schema = info[n.cls]
            sockets, fields = _layout(n, schema)
            inputs, widgets = [], [v for _, _, vals, _ in fields for v in vals]
            for name, typ, v in sockets:
                link = None
                if isinstance(v, Out):
                    link = len(links) + 1
                    links.append([link, v.node.id, v.slot, n.id, len(inputs), info[v.node.cls]["output"][v.slot]])
                    link_of[n.id, name] = (link, len(inputs))
                inputs.append({"localized_name": name, "name": name, "type": typ, "link": link})
            outputs = [{"localized_name": name, "name": name, "type": typ, "links": []}
                       for typ, name in zip(schema["output"], schema["output_name"])]
            ui_nodes.append(dict(
                id=n.id, type=n.cls, pos=list(n.pos),
                size=[n.width, n.height or 46 + 24 * (len(inputs) + len(widgets))],
                flags={}, order=order[n.id], mode=0, inputs=inputs, outputs=outputs,
                properties=_properties(n), widgets_values=widgets, **({"title": n.title} if n.title else {})))
        by_id = {u["id"]: u for u in ui_nodes}
        for link in links:
            by_id[link[1]]["outputs"][link[2]]["links"].append(link[0])
        extra = {"ds": {"scale": 0.6, "offset": [80, 80]}}
        if self.buses:
            extra["reroutes"], extra["linkExtensions"] = self._reroutes(link_of, links)
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "liteffn/" + self.title)), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": self.groups, "config": {}, "extra": extra, "version": 0.4}

    def _reroutes(self, link_of: dict, links: list):
        """The buses as the frontend stores native reroutes (both 1.43 and 1.49): points chained by parentId from
        the output's end, each listing the links through it, and per link its last point (linkExtensions)."""
        reroutes, ext = [], []
        def point(pos, ids, parent):
            reroutes.append(dict(id=len(reroutes) + 1, pos=list(pos), linkIds=list(ids),
                                 **({"parentId": parent} if parent else {})))
            return reroutes[-1]["id"]

        for src, targets, x, lane, drop in self.buses:
            own = len(targets[0]) == 3  # each target leaves the lane at its own x
            ends = [(*link_of[t[0].id, t[1]], t[0], t[2] if own else x) for t in targets]
            ends.sort(key=(lambda e: abs(e[3] - (drop or 0))) if own else (lambda e: _slot_y(e[2], e[1])))
            ids = [e[0] for e in ends]
            wrong = [t.cls for (lid, _, t, _) in ends if links[lid - 1][1:3] != [src.node.id, src.slot]]
            if wrong:
                raise ValueError(f"bus from {src.node.cls}[{src.slot}]: {wrong} take that input from elsewhere")
            y0 = lane if lane is not None else _slot_y(src.node, src.slot)
            parent = point((drop, y0), ids, None) if drop is not None else None
            if not own:
                parent = point((x, y0), ids, parent)
            for j, (lid, slot, t, tx) in enumerate(ends):  # in order along the line
                if own:  # along the lane to this target's x, then a point level with its input
                    parent = point((tx, y0), ids[j:], parent)
                    ext.append(dict(id=lid, parentId=point((tx, _slot_y(t, slot)), [lid], parent)))
                else:  # down the line, leaving it level with each input
                    parent = point((x, _slot_y(t, slot)), ids[j:], parent)
                    ext.append(dict(id=lid, parentId=parent))
        return reroutes, ext


def _slot_y(n: "Node", slot: int) -> float:
    """y of a node's input or output slot in the frontend (slots 20 px apart from the top of the body)."""
    return n.pos[1] + 14 + 20 * slot


class Out:
    def __init__(self, node: "Node", slot: int):
        self.node, self.slot = node, slot


class Node:
    def __init__(self, id, cls, pos, title, width, inputs, height=None):
        self.id, self.cls, self.pos, self.title, self.width, self.inputs = id, cls, pos, title, width, inputs
        self.height = height

    def __getitem__(self, slot: int) -> Out:
        return Out(self, slot)


class Note:
    def __init__(self, id, pos, text, title, size):
        self.id, self.pos, self.text, self.title, self.size = id, pos, text, title, size
        self.inputs = {}

    def ui(self, order):
        return dict(id=self.id, type="MarkdownNote", pos=list(self.pos), size=list(self.size), flags={},
                    order=order, mode=0, inputs=[], outputs=[], title=self.title, properties={},
                    widgets_values=[self.text], color="#432", bgcolor="#653")


def _kind(spec):
    """(socket | widget, options) of one /object_info input spec."""
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    # widgetType: a MultiType input ("FLOAT,INT", ComfyUI 0.33) drawn as that widget
    if isinstance(typ, list) or typ in WIDGET_TYPES or opts.get("widgetType"):
        return ("socket" if opts.get("forceInput") else "widget"), opts
    return "socket", opts


def _default(spec, opts):
    if "default" in opts:
        return opts["default"]
    options = spec[0] if isinstance(spec[0], list) else opts.get("options")
    if options:  # a combo's default is its first option, as in the frontend
        return options[0]["key"] if isinstance(options[0], dict) else options[0]
    raise KeyError


def _layout(n: Node, schema: dict):
    """The node's inputs in the frontend's order: sockets [(name, type, value)] and widgets [(name, spec, values,
    filled)]. A dynamic combo (ComfyUI 0.33) is followed by the inputs of the option its value picks, named
    "<combo>.<input>" (the graph may set them by the short name). A widget the graph does not set gets its
    declared default (filled: "required" / "optional"); optional ones at the end are left out: the frontend fills
    them in, and a ComfyUI that lacks them (a newer input) loads the same file."""
    given, sockets, fields = dict(n.inputs), [], []

    def walk(group: dict, order: list[str], prefix: str = ""):
        spec, optional = {**group.get("required", {}), **group.get("optional", {})}, group.get("optional", {})
        for name in order:
            full, (kind, opts) = prefix + name, _kind(spec[name])
            key = next((k for k in (full, name) if k in given), None)
            v = given.pop(key) if key else None
            if kind == "socket":
                sockets.append((full, spec[name][0], v))
                continue
            if isinstance(v, Out):
                raise ValueError(f"{n.cls}.{full}: widget inputs take values here, not links")
            filled = None if key else ("optional" if name in optional else "required")
            if filled:
                try:
                    v = _default(spec[name], opts)
                except KeyError:
                    raise KeyError(f"{n.cls}.{full} has no value in the graph and no default") from None
            # same seed every run: the comparison stays like for like
            fields.append((full, spec[name], [v, "fixed"] if opts.get("control_after_generate") else [v], filled))
            if spec[name][0] == "COMFY_DYNAMICCOMBO_V3":
                chosen = next((o["inputs"] for o in opts["options"] if o["key"] == v), None)
                if chosen is None:
                    raise ValueError(f"{n.cls}.{full}: {v!r} is not one of its options")
                walk(chosen, [*chosen.get("required", {}), *chosen.get("optional", {})], full + ".")

    order = schema.get("input_order", {})
    walk(schema["input"], order.get("required", []) + order.get("optional", []))
    while fields and fields[-1][3] == "optional":
        fields.pop()
    if given:
        raise KeyError(f"{n.cls} has no input(s) {sorted(given)}")
    return sockets, fields


def _properties(n: Node) -> dict:
    props = {"Node name for S&R": n.cls}
    models = [v for v in n.inputs.values() if isinstance(v, str) and v in MODEL_URLS]
    if models:  # the frontend offers these downloads when a file is missing, as ComfyUI's templates do
        props["models"] = [{"name": m, "url": MODEL_URLS[m][1], "directory": MODEL_URLS[m][0]} for m in models]
    return props


def _topological(g: Graph) -> dict[int, int]:
    order, done = {}, set()

    def visit(n):
        if n.id in done:
            return
        done.add(n.id)
        for v in n.inputs.values():
            if isinstance(v, Out):
                visit(v.node)
        order[n.id] = len(order)

    for n in g.nodes:
        visit(n)
    return order


# -------------------------------------------------------------------------------------------- graphs
def _show(g: Graph, out, pos, title: str, w: int = 400, h: int = 220):
    """ComfyUI's Preview as Text on a report or summary output: the frontend shows a node's text only there."""
    return g.node("PreviewAny", pos, title=title, w=w, h=h, source=out)


def _loaders(g: Graph, x=0, y=0):
    g.group("Models (names as in ComfyUI's LTX-2 templates)", (x - 10, y - 40, 440, 420), GRAY)
    ckpt = g.node("CheckpointLoaderSimple", (x, y), ckpt_name=CKPT, w=400)
    clip = g.node("LTXAVTextEncoderLoader", (x, y + 130), text_encoder=GEMMA, ckpt_name=CKPT, device="default",
                  w=400)
    audio_vae = g.node("LTXVAudioVAELoader", (x, y + 280), ckpt_name=CKPT, w=400)
    return ckpt, clip, audio_vae


def _negative(g: Graph, clip, pos):
    return g.node("CLIPTextEncode", pos, title="Negative prompt", text=NEGATIVE, clip=clip[0], w=420)


def _prompt(g: Graph, clip, text, pos, title="Prompt", negative=None):
    p = g.node("CLIPTextEncode", pos, title=title, text=text, clip=clip[0], w=420)
    n = negative or _negative(g, clip, (pos[0], pos[1] + 230))
    return g.node("LTXVConditioning", (pos[0] + 450, pos[1]), positive=p[0], negative=n[0], frame_rate=float(FPS),
                  w=260)


def _latent(g: Graph, audio_vae, pos):
    x, y = pos
    v = g.node("EmptyLTXVLatentVideo", (x, y), width=WIDTH, height=HEIGHT, length=FRAMES, batch_size=1)
    a = g.node("LTXVEmptyLatentAudio", (x, y + 190), frames_number=FRAMES, frame_rate=FPS, batch_size=1,
               audio_vae=audio_vae[0])
    return g.node("LTXVConcatAVLatent", (x + 350, y), video_latent=v[0], audio_latent=a[0], w=260)


def _sampling(g: Graph, latent, pos):
    x, y = pos
    noise = g.node("RandomNoise", (x, y), noise_seed=SEED)
    sampler = g.node("KSamplerSelect", (x, y + 120), sampler_name="euler")
    sigmas = g.node("LTXVScheduler", (x, y + 220), steps=STEPS, max_shift=2.05, base_shift=0.95, stretch=True,
                    terminal=0.1, latent=latent[0])
    return noise, sampler, sigmas


def _branch(g: Graph, model, cond, shared, latent, ckpt, audio_vae, name: str, pos, save_below: bool = False,
            gap: int = 0):
    """Sample one model, decode video and audio, save the video; returns its nodes by role. save_below: Save
    Video under the decoders (its player grows about 400 px after a run) instead of right of them; gap: more
    room before the decoders (for bus lines)."""
    x, y = pos
    noise, sampler, sigmas = shared
    guider = g.node("CFGGuider", (x, y), model=model, positive=cond[0], negative=cond[1], cfg=CFG, w=260)
    s = g.node("SamplerCustomAdvanced", (x, y + 150), noise=noise[0], guider=guider[0], sampler=sampler[0],
               sigmas=sigmas[0], latent_image=latent[0], w=260)
    sep = g.node("LTXVSeparateAVLatent", (x, y + 340), av_latent=s[1], w=260)  # denoised, as the template
    dx = (320 if save_below else 290) + gap
    frames = g.node("VAEDecode", (x + dx, y), samples=sep[0], vae=ckpt[2], w=240)
    sound = g.node("LTXVAudioVAEDecode", (x + dx, y + 110), samples=sep[1], audio_vae=audio_vae[0], w=240)
    video = g.node("CreateVideo", (x + dx, y + 230), images=frames[0], audio=sound[0], fps=float(FPS), w=240)
    g.node("SaveVideo", (x + dx, y + 370) if save_below else (x + dx + 270, y), video=video[0],
           filename_prefix=f"LiteFFN/{name}", format="auto", codec="auto", w=300)
    return dict(guider=guider, sampler=s, frames=frames, sound=sound)


def compare_ranks() -> Graph:
    """Four branches one under another. The inputs they share come down buses of native reroutes (lanes under
    the shared group, then corridors beside the columns they feed) instead of long diagonal links."""
    g = Graph("LTX-2: baseline vs LiteFFN r=32, 64, 512")
    ckpt, clip, audio_vae = _loaders(g)
    g.group("Prompt, size, seed (shared by every branch)", (460, -40, 1770, 520), GRAY)
    cond = _prompt(g, clip, PROMPT, (470, 0))
    latent = _latent(g, audio_vae, (1600, 0))
    shared = _sampling(g, latent, (1220, 0))
    g.note((2260, -40), title="Read me", size=(440, 420), text=(
        "# LTX-2 baseline vs LiteFFN\n"
        "One prompt and seed, four models: the checkpoint as is, and its FFNs compressed at rank 32, 64 and 512 "
        "(FP8 residual). Each branch saves its video under `output/LiteFFN/`; **LiteFFN Compare** shows PSNR and "
        "SSIM of every frame against the baseline, and plots the worst frame pair.\n\n"
        f"Needs `models/liteffn/{STATS}.safetensors`: run **ltx2_calibrate_and_compress** first. With `(none)` "
        "the compression is uncalibrated (plain SVD), which costs quality.\n\n"
        "The baseline branch is never altered: Compress Model returns a patched copy."))
    col_a, col_b, col_c = 630, 950, 1300  # sampling, decoding and saving, comparing
    y, h = 780, 880
    base = _branch(g, ckpt[0], cond, shared, latent, ckpt, audio_vae, "baseline", (col_a, y), save_below=True)
    g.group("Baseline (the checkpoint as is)", (620, y - 40, 640, h - 80), GREEN)
    rows = [base]
    comps, compares = [], []
    for i, r in enumerate((32, 64, 512)):
        yy = y + h * (i + 1)
        lite = g.node("LiteFFNCompressModel", (20, yy), title=f"LiteFFN Compress r={r}", w=400,
                      model=ckpt[0], stats_file=STATS + ".safetensors", rank=r, energy=0.0, residual="fp8",
                      streams="all", blocks="all", save_name="", layers="ffn", match_fp8=0.0)
        row = _branch(g, lite[0], cond, shared, latent, ckpt, audio_vae, f"r{r}", (col_a, yy), save_below=True)
        cmp = g.node("LiteFFNCompare", (col_c, yy), reference=base["frames"][0], test=row["frames"][0],
                     label=f"r={r} fp8", w=320)
        g.node("PreviewImage", (col_c + 350, yy), images=cmp[3], w=420)
        _show(g, cmp[2], (col_c, yy + 160), f"Compare report r={r}", w=320, h=420)
        _show(g, lite[1], (20, yy + 350), f"Compress report r={r}", w=400, h=300)
        g.group(f"LiteFFN r={r}", (10, yy - 40, col_c + 770 - 10, h - 80), PURPLE)
        rows.append(row)
        comps.append(lite)
        compares.append(cmp)
    # buses: lanes 15 px apart under the shared group; the loaders' drop between their group and the shared one,
    # the others right of their node; corridors left of the column they feed (the model also far left, for
    # the Compress nodes), further right for lower lanes so that lanes cross no corridor
    lane = iter(range(505, 700, 15))
    g.bus(ckpt[2], [(r["frames"], "vae") for r in rows], col_b - 45, next(lane), drop=445)
    g.bus(audio_vae[0], [(r["sound"], "audio_vae") for r in rows], col_b - 25, next(lane), drop=452)
    g.bus(ckpt[0], [(c, "model") for c in comps], -40, next(lane), drop=438)
    g.bus(ckpt[0], [(base["guider"], "model")], col_a - 160, next(lane), drop=438)
    for k, (out, name, drop, role) in enumerate([
            (cond[0], "positive", 1190, "guider"), (cond[1], "negative", 1200, "guider"),
            (shared[0][0], "noise", 1552, "sampler"), (shared[1][0], "sampler", 1564, "sampler"),
            (shared[2][0], "sigmas", 1576, "sampler"), (latent[0], "latent_image", 2222, "sampler")]):
        g.bus(out, [(r[role], name) for r in rows], col_a - 140 + 20 * k, next(lane), drop=drop)
    g.bus(base["frames"][0], [(c, "reference") for c in compares], col_c - 25)
    return g


def calibrate_and_compress() -> Graph:
    """Loaders, the negative prompt and the latents in the left column; a group per calibration prompt; Compress
    last. The inputs every group shares come by buses (native reroutes) over the groups' titles and down the gaps
    between them; the negative prompt's and the audio latent's own inputs up the far left."""
    g = Graph("LTX-2: calibrate LiteFFN on prompts, then compress")
    ckpt, clip, audio_vae = _loaders(g)
    negative = _negative(g, clip, (0, 420))
    latent = _latent(g, audio_vae, (0, 660))
    g.note((0, 1060), title="Read me", size=(640, 330), text=(
        "# Calibrate, then compress\n"
        "Each **LiteFFN Calibrate** samples the model on its prompt and records the input statistics of every "
        "FFN linear; chained through `stats`, the last one holds all prompts and saves them to "
        f"`models/liteffn/{STATS}.safetensors`. Add prompts by adding Calibrate nodes to the chain; use prompts "
        "like the videos you will make.\n\n"
        "**LiteFFN Compress Model** then writes "
        f"`models/liteffn/{COMPRESSED}.safetensors` for the **Low-Rank FFN Loader** (ltx2_t2v_liteffn).\n\n"
        "`memory_budget_gb`: LTX-2 19B needs ~63 GB of statistics for all FFNs; under a smaller budget the "
        "sampling runs once per group of layers (slower, same result). `storage: cpu` keeps them in RAM.\n\n"
        "`layers`: `ffn` compresses the FFNs; `ffn+attention` also every attention projection (q, k, v and out; "
        "~43 GiB more statistics). Set the same value on every Calibrate node and on Compress Model."))
    prev, texts, conds, cals = None, [], [], []
    step = 780  # a group's width and the 40 px gap whose bus lines feed it
    for i, text in enumerate(CALIBRATION_PROMPTS):
        x = 700 + step * i
        cond = _prompt(g, clip, text, (x, 0), title=f"Calibration prompt {i + 1}", negative=negative)
        last = i == len(CALIBRATION_PROMPTS) - 1
        cal = g.node("LiteFFNCalibrate", (x, 240), title=f"LiteFFN Calibrate {i + 1}", w=360,
                     model=ckpt[0], positive=cond[0], negative=cond[1], latent_image=latent[0], seed=SEED,
                     steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="simple", seeds=1, streams="all",
                     blocks="all", memory_budget_gb=8.0, storage="gpu", filename=STATS if last else "",
                     append=False, layers="ffn", **({"stats": prev[0]} if prev else {}))
        _show(g, cal[1], (x + 380, 240), f"Calibrate {i + 1} summary", w=340, h=300)
        g.group(f"Prompt {i + 1}", (x - 10, -40, 740, 900), BLUE)
        prev = cal
        texts.append(cond.inputs["positive"].node)
        conds.append(cond)
        cals.append(cal)
    x = 700 + step * len(CALIBRATION_PROMPTS)
    comp = g.node("LiteFFNCompressModel", (x, 480), w=400, model=ckpt[0], stats=prev[0], stats_file="(none)",
                  rank=64, energy=0.0, residual="fp8", streams="all", blocks="all", save_name=COMPRESSED,
                  layers="ffn", match_fp8=0.0)
    _show(g, comp[1], (x, 860), "Compress report", w=400, h=300)
    g.group("Compress and save", (x - 10, 440, 420, 740), PURPLE)
    # lanes above the groups' titles (the lowest first), one line per group down the gap left of it; the negative
    # conditioning's line runs between each prompt's text and its LTXVConditioning
    xs = [700 + step * i for i in range(len(CALIBRATION_PROMPTS))]
    g.bus(clip[0], [(t, "clip", x - 20) for t, x in zip(texts, xs)], lane=-100, drop=445)
    g.bus(ckpt[0], [(c, "model", x - 30) for c, x in zip(cals, xs)] + [(comp, "model", xs[-1] + step - 30)],
          lane=-115, drop=452)
    g.bus(latent[0], [(c, "latent_image", x - 40) for c, x in zip(cals, xs)], lane=-130, drop=625)
    g.bus(negative[0], [(c, "negative", x + 435) for c, x in zip(conds, xs)], lane=-145, drop=645)
    g.bus(clip[0], [(negative, "clip")], -30, 395, drop=445)
    g.bus(audio_vae[0], [(latent.inputs["audio_latent"].node, "audio_vae")], -45, 385, drop=452)
    # in each group, the conditioning down to Calibrate under the prompt's text; the statistics from one Calibrate
    # to the next (and to Compress) under the summaries, up the next group's left edge
    for x, cond, cal, nxt in zip(xs, conds, cals, cals[1:] + [comp]):
        g.bus(cond[0], [(cal, "positive", x - 8)], lane=190, drop=x + 725)
        g.bus(cond[1], [(cal, "negative", x - 4)], lane=200, drop=x + 735)
        g.bus(cal[0], [(nxt, "stats", nxt.pos[0] - 5)], lane=560, drop=x + 370)
    return g


def t2v_liteffn() -> Graph:
    """ComfyUI's LTX-2 text-to-video layout with the Loader under the model loaders; links that would cross
    nodes run as buses (native reroutes) over the graph, down the gap left of the sampling column and the one
    left of the decoders."""
    g = Graph("LTX-2 text to video with LiteFFN")
    ckpt, clip, audio_vae = _loaders(g)
    lite = g.node("LowRankFFNLoader", (0, 490), w=400, model=ckpt[0], compressed_file=COMPRESSED + ".safetensors")
    _show(g, lite[1], (0, 620), "Loader report", w=400, h=200)
    g.group("LiteFFN", (-10, 450, 440, 390), PURPLE)
    g.note((0, 910), title="Read me", size=(420, 260), text=(
        "# LTX-2 text to video, FFNs compressed\n"
        "ComfyUI's LTX-2 text-to-video with one node added: **Low-Rank FFN Loader** puts the compressed FFNs "
        f"(`models/liteffn/{COMPRESSED}.safetensors`, made by ltx2_calibrate_and_compress) onto the checkpoint "
        "they were made from; another checkpoint is refused with the reason.\n\n"
        "Width and height: multiples of 32; frames: 8k+1."))
    cond = _prompt(g, clip, PROMPT, (470, 0))
    latent = _latent(g, audio_vae, (470, 480))
    shared = _sampling(g, latent, (1200, 0))
    row = _branch(g, lite[0], cond, shared, latent, ckpt, audio_vae, "t2v", (1200, 520), gap=110)
    g.bus(ckpt[0], [(lite, "model")], -30, 397, drop=445)  # back down to the Loader, left of it
    g.bus(ckpt[2], [(row["frames"], "vae")], 1575, -100, drop=452)  # over the prompts and the sampling column
    g.bus(audio_vae[0], [(row["sound"], "audio_vae")], 1585, -115, drop=458)
    g.bus(lite[0], [(row["guider"], "model")], 1150, 860, drop=438)  # under the latents
    g.bus(latent[0], [(row["sampler"], "latent_image")], 1100)
    for k, (out, name, role) in enumerate([(shared[0][0], "noise", "sampler"), (shared[1][0], "sampler", "sampler"),
                                           (shared[2][0], "sigmas", "sampler")]):
        g.bus(out, [(row[role], name)], 1160 + 8 * k, 450 + 10 * k, drop=1530 + 10 * k)  # under the scheduler
    g.bus(cond[0], [(row["guider"], "positive")], 1186)
    g.bus(cond[1], [(row["guider"], "negative")], 1194)
    return g


GRAPHS = {"ltx2_compare_ranks": compare_ranks, "ltx2_calibrate_and_compress": calibrate_and_compress,
          "ltx2_t2v_liteffn": t2v_liteffn}


def object_info(source: str) -> dict:
    if source.startswith("http"):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60) as r:
            return json.loads(r.read())
    with open(source) as f:
        return json.load(f)


def write(info: dict, out_dir: str = HERE) -> list[str]:
    os.makedirs(os.path.join(out_dir, "api"), exist_ok=True)
    written = []
    for name, make in GRAPHS.items():
        g = make()
        for path, data in ((os.path.join(out_dir, name + ".json"), g.ui(info)),
                           (os.path.join(out_dir, "api", name + ".json"), g.api(info))):
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            written.append(path)
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--object-info", required=True, help="URL of a running ComfyUI, or a saved /object_info JSON")
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    for p in write(object_info(a.object_info), a.out):
        print("wrote", os.path.relpath(p))
