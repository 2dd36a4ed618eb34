"""A small, random-weight LTX-2 model set under the file names of ComfyUI's LTX-2 templates, so
the shipped workflows run end to end on a CPU ComfyUI in seconds:

  checkpoints/ltx-2-19b-dev-fp8.safetensors    the LTX-2 checkpoint layout:
      model.diffusion_model.*   LTX-AV transformer (ltx2_tiny) incl. its text embeddings connectors
      vae.*                     video VAE (8x temporal, 32x spatial, 128 latent channels, as LTX-2)
      audio_vae.*, vocoder.*    audio VAE (mel 64 bins, 8 latent channels, 16 kHz) + HiFi-GAN vocoder
      text_embedding_projection.aggregate_embed.weight   Gemma's 49 stacked hidden states -> text
      metadata "config": {"transformer", "vae", "audio_vae", "vocoder"}, which ComfyUI reads to
      size the transformer (model_detection), the video VAE (comfy.sd.VAE) and the audio VAE +
      vocoder (comfy.ldm.lightricks.vae.audio_vae.AudioVAE) -- no patching needed for those.
  text_encoders/gemma_3_12B_it_fp4_mixed.safetensors   Gemma 3 "12B" (48 layers, tiny width;
      needs the tiny_gemma shim in the loading process, see tiny_gemma/__init__.py) + vision
      tower, and `spiece_model`: a SentencePiece model trained here on a few sentences, with
      Gemma's special ids (0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 105 <start_of_turn>,
      106 <end_of_turn>). Stored in bf16, not as the real file's fp4/fp8 mix.

Every module is built from ComfyUI's own classes, so the keys and shapes are what ComfyUI's
loaders expect. One code path differs from the real 19B file's: there the text embeddings
connectors are 3840 wide with 2 blocks (ComfyUI's LTX-2 defaults), and LTXAVTEModel.load_sd then
switches to "compat mode" (the text encoder runs its own copies of the connectors and returns the
processed 2 x 3840 context). That test is on the literal width 3840, so with the tiny connectors
the text encoder returns the projected text unprocessed (`unprocessed_ltxav_embeds`) and the
transformer's own connectors process it (ComfyUI's path for checkpoints with other connectors).
Both are ComfyUI's code; the transformer blocks, whose FFNs the pack compresses, are the same.

`t2v_prompt()` is the API-format prompt of the template's single-stage text-to-video path.
Call after ComfyUI is importable (conftest's `pack` fixture, or ComfyUI's path on sys.path with
comfy.options.enable_args_parsing(False)); it imports the tiny_gemma shim."""
from __future__ import annotations

import io
import json
import os

import torch

import ltx2_tiny

CHECKPOINT = "ltx-2-19b-dev-fp8.safetensors"
TEXT_ENCODER = "gemma_3_12B_it_fp4_mixed.safetensors"

# ltx2_tiny's transformer (2 blocks, small text connectors), with both streams 4 heads x 128 = 512
# wide: FFN 512<->2048, so the shipped workflows' rank-512 compression fits (a larger rank than the
# layer is refused). 22M parameters.
TRANSFORMER = dict(ltx2_tiny.CONFIG, attention_head_dim=128, cross_attention_dim=512,
                   audio_attention_head_dim=128, audio_cross_attention_dim=512)

# LTX-2 video VAE layout (patch 4, pixel norm, SpaceToDepth encoder, DepthToSpace decoder) with one
# resnet per stage and 8 base channels: 8x time, 32x space, 128 latent channels as ComfyUI assumes.
VIDEO_VAE = {
    "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
    "latent_channels": 128, "patch_size": 4, "norm_layer": "pixel_norm", "latent_log_var": "uniform",
    "use_quant_conv": False, "causal_decoder": False, "timestep_conditioning": False,
    "scaling_factor": 1.0, "encoder_base_channels": 8, "decoder_base_channels": 8,
    "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_space_res", {"multiplier": 2}],
                       ["compress_time_res", {"multiplier": 2}], ["compress_all_res", {"multiplier": 2}],
                       ["compress_all_res", {"multiplier": 2}], ["res_x", {"num_layers": 1}]],
    "decoder_blocks": [["res_x", {"num_layers": 1, "inject_noise": False}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["res_x", {"num_layers": 1, "inject_noise": False}]],
}

# LTX-2 audio VAE layout (stereo mel, 64 bins, 8 latent channels, causal in time, 16 kHz, hop 160)
# at 8 base channels and one resnet per level.
AUDIO_VAE = {
    "model": {"params": {"sampling_rate": 16000, "ddconfig": {
        "double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "downsample_time": False,
        "in_channels": 2, "out_ch": 2, "ch": 8, "ch_mult": [1, 2, 4], "num_res_blocks": 1,
        "attn_resolutions": [], "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel",
        "causality_axis": "height"}}},
    "preprocessing": {"stft": {"filter_length": 1024, "hop_length": 160}},
}

# HiFi-GAN vocoder as LTX-2's (x240 upsampling: 16 kHz mel at hop 160 -> 24 kHz), 32 channels wide.
VOCODER = {"resblock": "1", "stereo": True, "upsample_initial_channel": 32,
           "upsample_rates": [6, 5, 2, 2, 2], "upsample_kernel_sizes": [16, 15, 8, 4, 4],
           "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
           "output_sample_rate": 24000}

_SENTENCES = [
    "A close-up of a cheerful girl puppet with curly auburn yarn hair and wide button eyes.",
    "Rain falls gently around her while she looks upward and begins to sing.",
    "The camera slowly dollies left across a quiet street at night, neon signs reflecting on wet asphalt.",
    "blurry, low quality, still frame, frames, watermark, overlay, titles, has blurbox, has subtitles",
    "A cat walks on the grass; birds fly over the river under a bright blue sky.",
    "Waves crash against the rocks as the sun sets behind the mountains.",
]


def spiece_model() -> torch.Tensor:
    """A tiny SentencePiece model with Gemma's special-token ids, serialised as ComfyUI stores it
    (uint8 tensor `spiece_model`)."""
    import sentencepiece as spm

    import tiny_gemma

    user = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(99)] + ["<start_of_turn>", "<end_of_turn>"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES), model_writer=buf, model_type="bpe", vocab_size=tiny_gemma.VOCAB - 64,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=user, hard_vocab_limit=False, num_threads=1,
        character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 105, 106)] == \
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    assert sp.get_piece_size() <= tiny_gemma.VOCAB
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def text_encoder_state_dict(seed=0) -> dict:
    """Gemma 3 "12B" as ComfyUI builds it under the tiny_gemma shim (keys model.*, vision_model.*,
    multi_modal_projector.*), random, plus the tokenizer."""
    import comfy.ops
    import comfy.text_encoders.llama

    import tiny_gemma  # noqa: F401  (Gemma3_12B builds tiny)

    m = comfy.text_encoders.llama.Gemma3_12B({}, torch.float32, "cpu", comfy.ops.disable_weight_init)
    sd = ltx2_tiny.random_like(m.state_dict(), seed + 1)
    sd["spiece_model"] = spiece_model()
    return sd


def checkpoint_state_dict(seed=0) -> tuple[dict, dict]:
    """(state dict, metadata) of the LTX-2 checkpoint: transformer, video VAE, audio VAE +
    vocoder, text projection."""
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    import tiny_gemma

    assert TRANSFORMER["caption_channels"] == tiny_gemma.PROJECTION_OUT == \
        TRANSFORMER["connector_num_attention_heads"] * TRANSFORMER["connector_attention_head_dim"]
    config = {"transformer": TRANSFORMER, "vae": VIDEO_VAE, "audio_vae": AUDIO_VAE, "vocoder": VOCODER}
    meta = {"config": json.dumps(config)}

    sd = ltx2_tiny.state_dict(TRANSFORMER, seed)
    video_vae = ltx2_tiny.random_like(VideoVAE(config=VIDEO_VAE).state_dict(), seed + 2)
    sd.update({"vae." + k: v for k, v in video_vae.items()})
    audio = ltx2_tiny.random_like(AudioVAE(metadata=meta).state_dict(), seed + 3)
    sd.update({("audio_vae." + k[len("autoencoder."):]) if k.startswith("autoencoder.") else k: v
               for k, v in audio.items()})
    g = torch.Generator().manual_seed(seed + 4)
    width = tiny_gemma.HIDDEN * (tiny_gemma.LAYERS + 1)
    sd["text_embedding_projection.aggregate_embed.weight"] = \
        (torch.randn(tiny_gemma.PROJECTION_OUT, width, generator=g) / width ** 0.5).to(torch.bfloat16)
    return sd, meta


def write_model_set(models_dir: str, seed=0) -> dict[str, str]:
    """Writes <models_dir>/checkpoints/ltx-2-19b-dev-fp8.safetensors and
    <models_dir>/text_encoders/gemma_3_12B_it_fp4_mixed.safetensors; returns their paths."""
    from safetensors.torch import save_file

    paths = {"checkpoint": os.path.join(models_dir, "checkpoints", CHECKPOINT),
             "text_encoder": os.path.join(models_dir, "text_encoders", TEXT_ENCODER)}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    sd, meta = checkpoint_state_dict(seed)
    save_file(sd, paths["checkpoint"], metadata=meta)
    save_file(text_encoder_state_dict(seed), paths["text_encoder"])
    return paths


def t2v_prompt(prefix="ltx2_tiny/t2v", seed=0, width=64, height=64, length=9, steps=2, cfg=3.0,
               text="A cat walks on the grass, birds fly over the river.",
               negative="blurry, low quality, still frame, watermark") -> dict:
    """ComfyUI API-format prompt: the single-stage text-to-video path of ComfyUI's video_ltx2_t2v
    template (same nodes and wiring, the model set's file names), saving an mp4 with audio.
    width/height: multiples of 32 (the latent is /32; the template asks for 64); length: 8k+1."""
    ckpt = {"ckpt_name": CHECKPOINT}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": dict(ckpt)},
        "2": {"class_type": "LTXAVTextEncoderLoader",
              "inputs": {"text_encoder": TEXT_ENCODER, "ckpt_name": CHECKPOINT, "device": "default"}},
        "3": {"class_type": "LTXVAudioVAELoader", "inputs": dict(ckpt)},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["2", 0]}},
        "6": {"class_type": "LTXVConditioning",
              "inputs": {"positive": ["4", 0], "negative": ["5", 0], "frame_rate": 25}},
        "7": {"class_type": "EmptyLTXVLatentVideo",
              "inputs": {"width": width, "height": height, "length": length, "batch_size": 1}},
        "8": {"class_type": "LTXVEmptyLatentAudio",
              "inputs": {"frames_number": length, "frame_rate": 25, "batch_size": 1, "audio_vae": ["3", 0]}},
        "9": {"class_type": "LTXVConcatAVLatent", "inputs": {"video_latent": ["7", 0], "audio_latent": ["8", 0]}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "12": {"class_type": "LTXVScheduler", "inputs": {"steps": steps, "max_shift": 2.05, "base_shift": 0.95,
                                                         "stretch": True, "terminal": 0.1, "latent": ["9", 0]}},
        "13": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["6", 0], "negative": ["6", 1],
                                                     "cfg": cfg}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["13", 0],
                                                                 "sampler": ["11", 0], "sigmas": ["12", 0],
                                                                 "latent_image": ["9", 0]}},
        "15": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["14", 1]}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "LTXVAudioVAEDecode", "inputs": {"samples": ["15", 1], "audio_vae": ["3", 0]}},
        "18": {"class_type": "CreateVideo", "inputs": {"images": ["16", 0], "fps": 25.0, "audio": ["17", 0]}},
        "19": {"class_type": "SaveVideo", "inputs": {"video": ["18", 0], "filename_prefix": prefix,
                                                     "format": "mp4", "codec": "h264"}},
    }
