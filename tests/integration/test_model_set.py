"""The small LTX-2 model set (ltx2_models) runs ComfyUI's LTX-2 text-to-video path end to end on
CPU: ComfyUI's own loaders, text encoder, sampler and decoders, with the tiny_gemma shim as the
only change (Gemma 3 12B built tiny; tiny_gemma/__init__.py says what it patches).

The shim stays applied for the rest of the pytest session (it patches ComfyUI's module attributes
at import). That only matters to a test that builds Gemma 3 12B; the other integration tests use
ltx2_tiny's transformer alone, with synthetic conditioning and no text encoder."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

torch = pytest.importorskip("torch")

EXTRAS = ["nodes_lt.py", "nodes_lt_audio.py", "nodes_custom_sampler.py", "nodes_video.py"]


@pytest.fixture(scope="module")
def model_set(pack, tmp_path_factory):
    """The set written to a temp models folder and registered with folder_paths; ComfyUI's LTX
    sampler/video nodes (comfy_extras) loaded as main.py loads them."""
    import folder_paths
    import nodes

    import ltx2_models
    import tiny_gemma  # noqa: F401  (the shim, as the server loads it from custom_nodes/)

    d = tmp_path_factory.mktemp("models")
    paths = ltx2_models.write_model_set(str(d))
    for kind in ("checkpoints", "text_encoders"):
        folder_paths.add_model_folder_path(kind, str(d / kind), is_default=True)
    extras = os.path.join(os.path.dirname(os.path.realpath(nodes.__file__)), "comfy_extras")
    for f in EXTRAS:
        assert asyncio.run(nodes.load_custom_node(os.path.join(extras, f), module_parent="comfy_extras")), f
    return paths


def _run(node_id, **inputs):
    """One ComfyUI node called as the executor calls it (V1: FUNCTION; V3: execute -> NodeOutput)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)
    return cls.execute(**inputs).args


def test_files_are_small_and_named_as_the_template(model_set):
    from safetensors import safe_open

    assert os.path.basename(model_set["checkpoint"]) == "ltx-2-19b-dev-fp8.safetensors"
    assert os.path.basename(model_set["text_encoder"]) == "gemma_3_12B_it_fp4_mixed.safetensors"
    assert sum(os.path.getsize(p) for p in model_set.values()) < 80e6  # 66 MB: the 512-wide transformer
    with safe_open(model_set["checkpoint"], "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
        assert set(json.loads(f.metadata()["config"])) == {"transformer", "vae", "audio_vae", "vocoder"}
    assert prefixes == {"model", "vae", "audio_vae", "vocoder", "text_embedding_projection"}
    with safe_open(model_set["text_encoder"], "pt") as f:
        assert "spiece_model" in f.keys() and "model.layers.47.self_attn.q_norm.weight" in f.keys()


def test_text_to_video_pipeline(model_set):
    """CheckpointLoaderSimple + LTXAVTextEncoderLoader + LTXVAudioVAELoader -> CLIPTextEncode x2 ->
    LTXVConditioning; empty AV latent; SamplerCustomAdvanced (euler, LTXVScheduler, CFGGuider);
    VAEDecode + LTXVAudioVAEDecode -> CreateVideo. Then KSampler on the same inputs."""
    import comfy.sd
    import ltx2_models
    import tiny_gemma

    ckpt, te = ltx2_models.CHECKPOINT, ltx2_models.TEXT_ENCODER
    with torch.inference_mode():
        model, clip, vae = _run("CheckpointLoaderSimple", ckpt_name=ckpt)
        assert clip is None  # LTX-2 checkpoints carry no Gemma: the CLIP comes from LTXAVTextEncoderLoader
        assert type(model.model).__name__ == "LTXAV"
        clip, = _run("LTXAVTextEncoderLoader", text_encoder=te, ckpt_name=ckpt, device="default")
        assert isinstance(clip, comfy.sd.CLIP)
        audio_vae, = _run("LTXVAudioVAELoader", ckpt_name=ckpt)

        pos, = _run("CLIPTextEncode", text="A cat walks on the grass, birds fly over the river.", clip=clip)
        neg, = _run("CLIPTextEncode", text="blurry, low quality", clip=clip)
        cond, extra = pos[0]
        assert cond.shape[0] == 1 and cond.shape[2] == tiny_gemma.PROJECTION_OUT and torch.isfinite(cond).all()
        assert extra.get("unprocessed_ltxav_embeds") is True  # the transformer's connectors take it from here
        pos, neg = _run("LTXVConditioning", positive=pos, negative=neg, frame_rate=25)

        video, = _run("EmptyLTXVLatentVideo", width=64, height=64, length=9, batch_size=1)
        audio, = _run("LTXVEmptyLatentAudio", frames_number=9, frame_rate=25, batch_size=1, audio_vae=audio_vae)
        assert tuple(video["samples"].shape) == (1, 128, 2, 2, 2) and tuple(audio["samples"].shape) == (1, 8, 9, 16)
        av, = _run("LTXVConcatAVLatent", video_latent=video, audio_latent=audio)

        noise, = _run("RandomNoise", noise_seed=0)
        sampler, = _run("KSamplerSelect", sampler_name="euler")
        sigmas, = _run("LTXVScheduler", steps=2, max_shift=2.05, base_shift=0.95, stretch=True, terminal=0.1, latent=av)
        guider, = _run("CFGGuider", model=model, positive=pos, negative=neg, cfg=3.0)
        _, denoised = _run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                           latent_image=av)

        video_latent, audio_latent = _run("LTXVSeparateAVLatent", av_latent=denoised)
        frames, = _run("VAEDecode", samples=video_latent, vae=vae)
        sound, = _run("LTXVAudioVAEDecode", samples=audio_latent, audio_vae=audio_vae)
        assert tuple(frames.shape) == (9, 64, 64, 3) and torch.isfinite(frames).all() and frames.std() > 0
        wave = sound["waveform"]
        assert sound["sample_rate"] == 24000 and wave.shape[:2] == (1, 2) and wave.shape[2] > 0
        assert torch.isfinite(wave).all()
        clip_video, = _run("CreateVideo", images=frames, fps=25.0, audio=sound)
        assert clip_video.get_dimensions() == (64, 64)

        samples, = _run("KSampler", model=model, seed=0, steps=2, cfg=3.0, sampler_name="euler", scheduler="simple",
                        positive=pos, negative=neg, latent_image=av, denoise=1.0)
        v, a = samples["samples"].unbind()
        assert v.shape == video["samples"].shape and a.shape == audio["samples"].shape
        assert torch.isfinite(v).all() and torch.isfinite(a).all()


class _Server:
    """What ComfyUI's PromptExecutor asks of its PromptServer: client id, last node, messages."""
    client_id = None
    last_node_id = None
    sockets_metadata: dict = {}

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def test_api_prompt_through_the_executor(model_set, tmp_path):
    """ltx2_models.t2v_prompt (the template's text-to-video path, without this pack's nodes)
    validated and executed by ComfyUI's own executor, SaveVideo writing an mp4."""
    import execution
    import folder_paths

    import ltx2_models

    prompt = ltx2_models.t2v_prompt()
    valid = asyncio.run(execution.validate_prompt("tiny", prompt, None))
    assert valid[0], valid
    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        e = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC,
                                     cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        e.execute(prompt, "tiny", {}, valid[2])
    finally:
        folder_paths.set_output_directory(before)
    assert e.success, [m for m in e.status_messages if m[0] == "execution_error"]
    saved = e.history_result["outputs"]["19"]
    files = saved.get("images", []) + saved.get("videos", []) + saved.get("gifs", [])
    assert files, saved
    path = os.path.join(str(tmp_path), files[0]["subfolder"], files[0]["filename"])
    assert path.endswith(".mp4") and os.path.getsize(path) > 0
